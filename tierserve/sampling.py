"""SamplingParams: how one request picks its next tokens (shaped like vLLM's)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

MAX_LOGPROBS = 20


def _int(name: str, value, *, lo: int | None = None, hi: int | None = None, allowed: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{allowed and ' ' + allowed}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {allowed or _range(lo, hi)}, got {value!r}")
    return value


def _range(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    return f"in [{lo}, {hi}]"


def _float(name: str, value, allowed: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """Per-request sampling settings. Every field is validated in ``__post_init__``.

    temperature 0 means greedy; top_k 0 (or -1) disables top-k; max_tokens None means
    "up to max_model_len"; stop is normalised to a list of non-empty strings.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, lo=1)
        self.temperature = _float("temperature", self.temperature, ">= 0 (0 means greedy)",
                                  lambda v: v >= 0)
        self.top_p = _float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        self.top_k = _int("top_k", self.top_k, allowed="0 or -1 (disabled) or >= 1")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _float("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        if self.seed is not None:
            self.seed = _int("seed", self.seed, allowed="or None")
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, lo=1)
        self.min_tokens = _int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        self.stop = self._norm_stop(self.stop)
        self.stop_token_ids = self._norm_stop_ids(self.stop_token_ids)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, "> 0",
                                         lambda v: v > 0)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, "in [-2, 2]",
                                       lambda v: -2 <= v <= 2)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, "in [-2, 2]",
                                        lambda v: -2 <= v <= 2)
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output",
                                                self.include_stop_str_in_output)

    @staticmethod
    def _norm_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string, a list of strings or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        return list(stop)

    @staticmethod
    def _norm_stop_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0 or None, got {ids!r}")
        return [_int("stop_token_ids", t, lo=0, allowed=">= 0 (each entry)") for t in ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
