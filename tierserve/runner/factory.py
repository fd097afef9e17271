"""Pick the runner for a model: ``ModelRunner`` (paged KV, Llama family) or ``StatefulRunner``
(explicit per-request state, DeepSeek-V4)."""
from __future__ import annotations

from pathlib import Path

from tierserve.config import EngineConfig
from tierserve.models.registry import is_stateful


def make_runner(config: EngineConfig, model_path: Path, model_cfg, max_model_len: int, progress: bool = False):
    if config.cpu_experts and not getattr(getattr(model_cfg, "model", None), "n_routed_experts", 0):
        raise ValueError(f"cpu_experts=True: {model_cfg.architecture} has no routed (MoE) experts to place in "
                         "CPU RAM; it is supported for DeepseekV4ForCausalLM")
    if is_stateful(model_cfg.architecture):
        from tierserve.runner.stateful_runner import StatefulRunner
        return StatefulRunner(config, model_path, model_cfg, max_model_len, progress)
    from tierserve.runner.model_runner import ModelRunner
    return ModelRunner(config, model_path, model_cfg, max_model_len, progress)
