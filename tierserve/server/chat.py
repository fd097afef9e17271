"""POST /v1/chat/completions: the model's chat template, n, logprobs / top_logprobs, SSE streaming."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tierserve.engine.async_engine import EngineDeadError, RequestStream
from tierserve.engine.outputs import CompletionOutput, RequestOutput
from tierserve.server.app import ServerState, state
from tierserve.server.protocol import APIError, ChatCompletionRequest, ChatMessage, param_of
from tierserve.server.streaming import (DONE, SSE_HEADERS, admit, cancel_on_disconnect, chat_logprobs, collect,
                                        holdback, sse, usage, visible)


def render_chat(st: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                template_kwargs: dict | None = None) -> list[int]:
    """Chat template -> token ids. A template that fails on these messages is the caller's 400."""
    if not st.tokenizer.chat_templates:
        raise APIError("messages: this model has no chat template; use /v1/completions", param="messages")
    try:
        return st.tokenizer.apply_chat_template([m.as_dict() for m in messages],
                                                add_generation_prompt=add_generation_prompt, tokenize=True,
                                                **(template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 -- jinja raises many kinds (incl. raise_exception in templates)
        raise APIError(f"messages: the chat template could not render them: {e}", param="messages") from None


class _Chat:
    def __init__(self, st: ServerState, req: ChatCompletionRequest) -> None:
        self.st, self.req = st, req
        self.ids = render_chat(st, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        if not self.ids:
            raise APIError("messages: the chat template rendered an empty prompt", param="messages")
        st.check_length(self.ids, req.max_new_tokens, param="messages")
        self.k = (req.top_logprobs or 0) if req.logprobs else None
        try:
            self.params = req.sampling_params(req.max_new_tokens, self.k)
        except ValueError as e:
            raise APIError(str(e), param=param_of(str(e))) from None
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.st.model_name,
                "choices": choices}

    def logprobs(self, c: CompletionOutput, start: int) -> dict | None:
        if self.k is None:
            return None
        ids = c.token_ids[start:]
        return {"content": chat_logprobs(self.st.token_text, ids, (c.logprobs or [])[start:len(c.token_ids)],
                                         self.k)}


async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
    st = state(raw)
    st.check_model(req.model)
    job = _Chat(st, req)
    handles = await admit(st.async_engine, [(job.id, job.ids, job.params)], prompt_param="messages")
    if req.stream:
        return StreamingResponse(_stream(job, handles[0]), media_type="text/event-stream", headers=SSE_HEADERS)
    ok, outs = await cancel_on_disconnect(raw, collect(st.async_engine, handles))
    if not ok:
        return Response(status_code=499)
    out = outs[0]
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": job.logprobs(c, 0), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for c in out.outputs]
    body = job.envelope("chat.completion", choices)
    body["usage"] = usage([len(job.ids)], [out])
    return JSONResponse(body)


async def _stream(job: _Chat, handle: RequestStream) -> AsyncIterator[str]:
    n, hold = job.req.n, holdback(job.params)
    sent_text, sent_tok, started, done = [0] * n, [0] * n, [False] * n, [False] * n
    last: RequestOutput | None = None
    obj = "chat.completion.chunk"
    try:
        async for out in job.st.async_engine.stream(handle):
            last = out
            for c in out.outputs:
                k = c.index
                if done[k]:
                    continue
                if not started[k]:
                    started[k] = True
                    yield sse(job.envelope(obj, [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]))
                finished = c.finish_reason is not None
                end = max(visible(c.text, finished, hold), sent_text[k])
                delta = c.text[sent_text[k]:end]
                lp = job.logprobs(c, sent_tok[k])
                sent_tok[k] = len(c.token_ids)
                if not (delta or finished or (lp and lp["content"])):
                    continue
                sent_text[k], done[k] = end, finished
                choice = {"index": k, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                          "finish_reason": c.finish_reason if finished else None}
                if finished:
                    choice["stop_reason"] = c.stop_reason
                yield sse(job.envelope(obj, [choice]))
        if job.req.include_usage:
            body = job.envelope(obj, [])
            body["usage"] = usage([len(job.ids)], [last])
            yield sse(body)
    except EngineDeadError as e:
        yield sse(APIError(str(e), status=503, type="service_unavailable").body())
    yield DONE
