"""Helpers shared by the generation endpoints: admission, SSE framing, stream merging, disconnects,
and logprob formatting (OpenAI legacy completions shape and chat shape)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Any, AsyncIterator, Awaitable, Sequence

from fastapi import Request

from tierserve.engine.async_engine import AsyncEngine, RequestStream
from tierserve.engine.outputs import RequestOutput
from tierserve.sampling import SamplingParams
from tierserve.server.protocol import APIError, param_of

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MIN_LOGPROB = -9999.0         # JSON has no -inf; OpenAI clients expect a number


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def admit(ae: AsyncEngine, items: Sequence[tuple[str, list[int], SamplingParams]],
                prompt_param: str = "prompt") -> list[RequestStream]:
    """Add all requests at once (one step boundary); on any ValueError abort the others and answer 400."""
    results = await asyncio.gather(*(ae.add_request(rid, ids, sp) for rid, ids, sp in items),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if not errors:
        return list(results)
    for (rid, _, _), r in zip(items, results):
        if not isinstance(r, BaseException):
            ae.abort(rid)
    err = errors[0]
    if isinstance(err, ValueError):
        msg = str(err)
        param = param_of(msg)
        if param == "prompt":
            param = prompt_param
        raise APIError(msg, param=param)
    raise err


async def merge(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams as (stream index, output). Leaving early cancels them all (each
    stream aborts its request)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in it:
                q.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 -- re-raised in the consumer
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await q.get()
            if item is end:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(ae: AsyncEngine, handles: Sequence[RequestStream]) -> list[RequestOutput]:
    last: dict[int, RequestOutput] = {}
    async for i, out in merge([ae.stream(h) for h in handles]):
        last[i] = out
    return [last[i] for i in range(len(handles))]


async def _until_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Run ``work``; if the client goes away first, cancel it (its streams abort their requests).
    Returns (True, result) or (False, None) on disconnect."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


def visible(text: str, finished: bool, holdback: int) -> int:
    """How much of a running completion's text may be streamed: hold back what could still turn out to
    be the start of a stop string (the engine cuts it once the stop string completes)."""
    return len(text) if finished or holdback <= 0 else max(0, len(text) - holdback)


# ---- logprobs -----------------------------------------------------------------------------------
def _lp(v: float | None) -> float | None:
    if v is None:
        return None
    return MIN_LOGPROB if math.isnan(v) or v < MIN_LOGPROB else v


def completion_logprobs(token_text, ids: Sequence[int], lps: Sequence[dict | None], offset: int = 0
                        ) -> tuple[dict, int]:
    """OpenAI legacy shape: tokens, token_logprobs, top_logprobs, text_offset. Returns it and the offset
    after the last token (for the next streamed chunk)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, d in zip(ids, lps):
        t = token_text(tid)
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
        if d is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(_lp(d.get(tid)))
            top: dict[str, float | None] = {}
            for k, v in d.items():          # the chosen token comes first and wins a text collision
                top.setdefault(token_text(k), _lp(v))
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(token_text, ids: Sequence[int], lps: Sequence[dict], k: int) -> list[dict]:
    """Chat shape: one entry per token with its top-k alternatives (``logprobs.content``)."""
    def entry(tid: int, v: float | None) -> dict:
        t = token_text(tid)
        return {"token": t, "logprob": _lp(v), "bytes": list(t.encode("utf-8"))}
    content = []
    for tid, d in zip(ids, lps):
        e = entry(tid, d.get(tid))
        e["top_logprobs"] = [entry(i, v) for i, v in sorted(d.items(), key=lambda kv: -kv[1])[:k]]
        content.append(e)
    return content


def usage(prompt_lens: Sequence[int], outs: Sequence[RequestOutput | None]) -> dict:
    p = sum(prompt_lens)
    c = sum(len(x.token_ids) for o in outs if o is not None for x in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs if o is not None)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def holdback(params: SamplingParams) -> int:
    return max((len(s) for s in params.stop or ()), default=0) - 1
