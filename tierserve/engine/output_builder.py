"""The Engine's side of request outputs: a ``RequestOutput`` per step for each request that produced tokens,
n > 1 samples gathered under their parent id, and the per-request state dropped once an output is final. A
mixin of ``Engine``, whose ``requests``, ``_detok``, ``_stop``, ``_parent``, ``_groups`` and
``finished_outputs_only`` it uses."""
from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.engine.outputs import CompletionOutput, RequestOutput
from tierserve.engine.request import Request


@dataclass
class SampleGroup:
    """A request with n > 1 samples: n child requests sharing one output."""
    request_id: str
    children: list[str]
    finished: set[str] = field(default_factory=set)


class OutputBuilder:
    def _emit(self, req: Request, outputs: list[RequestOutput]) -> None:
        if self.finished_outputs_only and not req.is_finished:
            return
        out = self._output(req)
        if out is not None:
            outputs.append(out)

    def _completion(self, req: Request, index: int) -> CompletionOutput:
        text = self._stop[req.request_id].final_text(self._detok[req.request_id].text)
        return CompletionOutput(index, text, list(req.output_token_ids), req.logprobs,
                                req.finish_reason, req.stop_reason)

    def _output(self, req: Request) -> RequestOutput | None:
        rid = req.request_id
        parent = self._parent.get(rid)
        if parent is None:
            out = self._make_output(rid, [req])
            if req.is_finished:
                self._forget(rid)
            return out
        group = self._groups[parent]
        if req.is_finished:
            group.finished.add(rid)
        reqs = [self.requests[c] for c in group.children]
        out = self._make_output(parent, reqs)
        if len(group.finished) == len(group.children):
            for c in group.children:
                self._forget(c)
            del self._groups[parent]
        return out

    def _make_output(self, rid: str, reqs: list[Request]) -> RequestOutput:
        first = reqs[0]
        m = {"arrival_time": first.arrival_time}
        if first.first_token_time is not None:
            m["first_token_time"] = first.first_token_time
        return RequestOutput(rid, first.prompt, first.prompt_token_ids,
                             [self._completion(r, i) for i, r in enumerate(reqs)],
                             finished=all(r.is_finished for r in reqs),
                             prompt_logprobs=first.prompt_logprobs,
                             num_cached_tokens=max(first.num_cached_tokens, 0),
                             cached_tokens_by_tier=dict(first.cached_tokens_by_tier), metrics=m)

    def _forget(self, rid: str) -> None:
        self.requests.pop(rid, None)
        self._detok.pop(rid, None)
        self._stop.pop(rid, None)
        self._parent.pop(rid, None)
