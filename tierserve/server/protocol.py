"""Request bodies of the OpenAI-compatible API (pydantic, strict types) and their SamplingParams.

Field names, ranges and defaults follow the OpenAI API; vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...) are accepted too. Unknown fields are
ignored, as vLLM does. Every range here is checked again by ``SamplingParams``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tierserve.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 64                  # samples per prompt (n)
MAX_BATCH = 1024            # prompts x n in one completions request
MAX_STOP = 16               # stop strings per request
MAX_SEED = (1 << 63) - 1


class APIError(Exception):
    """An error the API answers with an OpenAI-style JSON body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def param_of(message: str) -> str | None:
    """The field a SamplingParams / Engine ValueError names: its first word ("top_p must be ...")."""
    word = message.split(" ", 1)[0].strip(":")
    return word if word.replace("_", "").isalnum() else None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: Optional[str] = Field(None, description="served model name; default: the only model served")
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=1 << 30)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = Field(None, max_length=64)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=1 << 24)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @model_validator(mode="after")
    def _common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise ValueError("stop_token_ids: token ids must be >= 0")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError naming the field when a combination is invalid."""
        def pick(v, default):
            return default if v is None else v
        return SamplingParams(
            n=self.n, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0), seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptType = Field(..., description="text, token ids, or a batch of either")
    max_tokens: Optional[int] = Field(16, ge=1, le=1 << 24)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        prompts = self.prompts()
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt: must not be empty")
        if len(prompts) * self.n > MAX_BATCH:
            raise ValueError(f"prompt: prompts x n must be <= {MAX_BATCH}, got {len(prompts)} x {self.n}")
        if any(t < 0 for p in prompts if isinstance(p, list) for t in p):
            raise ValueError("prompt: token ids must be >= 0")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")   # tool_calls etc. pass through to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = "".join(p.text for p in self.content)
        d.setdefault("content", "")
        return d


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=4096)
    max_tokens: Optional[int] = Field(None, ge=1, le=1 << 24)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=1 << 24)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int] = Field(..., max_length=1 << 20)
