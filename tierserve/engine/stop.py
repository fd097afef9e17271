"""Stop conditions of one request: stop token ids, EOS, stop strings, max_tokens, max_model_len."""
from __future__ import annotations

from tierserve.engine.request import Request
from tierserve.sampling import SamplingParams


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids: set[int]) -> None:
        self.params = params
        self.eos = set() if params.ignore_eos else eos_token_ids
        self.stop_ids = set(params.stop_token_ids or ())
        self.stops = list(params.stop or ())
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self.cut: int | None = None    # text length to keep when a stop string matched

    def check(self, req: Request, tok: int, detok, delta: str, max_model_len: int) -> str | None:
        """Sets req.finish_reason / stop_reason and returns the reason when the request must stop."""
        n = len(req.output_token_ids)
        if n > self.params.min_tokens or n == req.max_tokens:
            if tok in self.stop_ids or tok in self.eos:
                req.finish_reason, req.stop_reason = "stop", tok if tok in self.stop_ids else None
                return "stop"
            if self.stops and delta:
                text = detok.text
                start = max(0, len(text) - len(delta) - self.max_stop_len + 1)
                hits = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
                if hits:
                    i, s = min(hits)
                    self.cut = i + len(s) if self.params.include_stop_str_in_output else i
                    req.finish_reason, req.stop_reason = "stop", s
                    return "stop"
        if n >= req.max_tokens or req.num_tokens >= max_model_len:
            req.finish_reason = "length"
            return "length"
        return None

    def final_text(self, text: str) -> str:
        return text if self.cut is None else text[:self.cut]
