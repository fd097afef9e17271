"""POST /v1/completions: text or token-id prompts (batched), n, echo, logprobs, SSE streaming."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tierserve.engine.async_engine import EngineDeadError, RequestStream
from tierserve.engine.outputs import CompletionOutput, RequestOutput
from tierserve.server.app import ServerState, state
from tierserve.server.protocol import APIError, CompletionRequest, param_of
from tierserve.server.streaming import (DONE, SSE_HEADERS, admit, cancel_on_disconnect, collect,
                                        completion_logprobs, holdback, merge, sse, usage, visible)


class _Job:
    """One completion request: its prompts (text, ids), engine request ids and response envelope."""

    def __init__(self, st: ServerState, req: CompletionRequest) -> None:
        self.st, self.req = st, req
        tok = st.tokenizer
        self.prompts: list[tuple[str, list[int]]] = []
        for p in req.prompts():
            if isinstance(p, str):
                self.prompts.append((p, tok.encode(p)))
            else:
                self.prompts.append((None, list(p)))
        for _, ids in self.prompts:
            st.check_length(ids, req.max_tokens)
        lp = req.logprobs
        try:
            self.params = req.sampling_params(req.max_tokens, lp, lp if (req.echo and lp is not None) else None)
        except ValueError as e:
            raise APIError(str(e), param=param_of(str(e))) from None
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.rids = [f"{self.id}-{i}" for i in range(len(self.prompts))]
        self.created = int(time.time())

    def prompt_text(self, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else self.st.tokenizer.decode(ids, skip_special_tokens=False)

    def envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.st.model_name, "choices": choices}

    def logprobs(self, i: int, out: RequestOutput, c: CompletionOutput, start: int, with_prompt: bool,
                 offset: int) -> tuple[dict | None, int]:
        if self.req.logprobs is None:
            return None, offset
        ids, lps = list(c.token_ids[start:]), list((c.logprobs or [])[start:len(c.token_ids)])
        if with_prompt:
            p_ids = self.prompts[i][1]
            p_lps = list(out.prompt_logprobs or [None] * len(p_ids))
            ids, lps = p_ids + ids, p_lps + lps
        return completion_logprobs(self.st.token_text, ids, lps, offset)


async def create_completion(req: CompletionRequest, raw: Request) -> Response:
    st = state(raw)
    st.check_model(req.model)
    job = _Job(st, req)
    handles = await admit(st.async_engine,
                          [(rid, ids, job.params) for rid, (_, ids) in zip(job.rids, job.prompts)])
    if req.stream:
        return StreamingResponse(_stream(job, handles), media_type="text/event-stream", headers=SSE_HEADERS)
    ok, outs = await cancel_on_disconnect(raw, collect(st.async_engine, handles))
    if not ok:
        return Response(status_code=499)
    choices = []
    for i, out in enumerate(outs):
        for c in out.outputs:
            text = (job.prompt_text(i) + c.text) if req.echo else c.text
            lp, _ = job.logprobs(i, out, c, 0, req.echo, 0)
            choices.append({"index": i * req.n + c.index, "text": text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    body = job.envelope(choices)
    body["usage"] = usage([len(ids) for _, ids in job.prompts], outs)
    return JSONResponse(body)


async def _stream(job: _Job, handles: list[RequestStream]) -> AsyncIterator[str]:
    req, n = job.req, job.req.n
    hold = holdback(job.params)
    k_all = len(job.prompts) * n
    sent_text, sent_tok, offsets = [0] * k_all, [0] * k_all, [0] * k_all
    started, done = [False] * k_all, [False] * k_all
    last: list[RequestOutput | None] = [None] * len(job.prompts)
    try:
        async for i, out in merge([job.st.async_engine.stream(h) for h in handles]):
            last[i] = out
            for c in out.outputs:
                k = i * n + c.index
                if done[k]:
                    continue
                finished = c.finish_reason is not None
                end = max(visible(c.text, finished, hold), sent_text[k])
                delta = c.text[sent_text[k]:end]
                first_echo = req.echo and not started[k]
                if first_echo:
                    delta = job.prompt_text(i) + delta
                lp, offsets[k] = job.logprobs(i, out, c, sent_tok[k], first_echo, offsets[k])
                sent_tok[k] = len(c.token_ids)
                if not (delta or finished or first_echo or (lp and lp["tokens"])):
                    continue
                sent_text[k], started[k], done[k] = end, True, finished
                choice = {"index": k, "text": delta, "logprobs": lp,
                          "finish_reason": c.finish_reason if finished else None,
                          "stop_reason": c.stop_reason if finished else None}
                yield sse(job.envelope([choice]))
        if req.include_usage:
            body = job.envelope([])
            body["usage"] = usage([len(ids) for _, ids in job.prompts], last)
            yield sse(body)
    except EngineDeadError as e:
        yield sse(APIError(str(e), status=503, type="service_unavailable").body())
    yield DONE
