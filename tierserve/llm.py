"""Offline facade shaped like vLLM's ``LLM``: generate and chat over a whole batch of prompts."""
from __future__ import annotations

import itertools
import sys
from typing import Any, Sequence

from tierserve.config import EngineConfig
from tierserve.engine.engine import Engine
from tierserve.engine.outputs import RequestOutput
from tierserve.loader.tokenizer import Tokenizer
from tierserve.progress import ProgressBar
from tierserve.sampling import SamplingParams

PromptType = str | Sequence[int]


class LLM:
    """``LLM(model=None)`` runs the embedded tierserve-nano; every other keyword is an engine setting."""

    def __init__(self, model: str | None = None, **engine_settings: Any) -> None:
        self.config = EngineConfig.from_kwargs(model=model, **engine_settings)
        self.engine = Engine(self.config, progress=sys.stderr.isatty())
        self.engine.finished_outputs_only = True     # generate() waits for whole outputs
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, params):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, p, sp)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False, **template_kwargs: Any
             ) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           **template_kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = ProgressBar("generating", len(ids)) if use_tqdm else None
        try:
            while len(done) < len(ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("engine stopped with unfinished requests")
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar:
                            bar.advance()
        finally:
            if bar:
                bar.close()
        return [done[i] for i in ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]      # a single list of token ids
    return prompts

