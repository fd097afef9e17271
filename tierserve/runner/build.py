"""Building a Llama-family model for the ModelRunner: structure on the meta device, storage on the compute
device, then weights from safetensors straight to the device (FP8 checkpoints as stored), or random dummy
weights drawn from the seed alone; FP8 quantisation on load and the fused Triton ops where asked."""
from __future__ import annotations

from pathlib import Path

import torch

from tierserve.config import EngineConfig
from tierserve.loader.hf import iter_safetensors, load_config, safetensors_files
from tierserve.models.config import ModelConfig
from tierserve.models.registry import get_model_class
from tierserve.quant.fp8 import fp8_format_from_hf


def build_model(config: EngineConfig, model_cfg: ModelConfig, model_path: Path, backend, max_model_len: int,
                device: torch.device, dtype: torch.dtype, progress: bool = False) -> torch.nn.Module:
    cls = get_model_class(model_cfg.architecture)
    with torch.device("meta"):
        model = cls(model_cfg, backend, max_model_len, dtype=dtype)
    model = model.to_empty(device=device)
    model.rotary.build(device)
    if model_cfg.engram is not None:
        model.attach_engram(config.engram_placement, device, dtype)
    if config.load_format == "dummy":
        init_dummy(model, config.seed)
        for layer in model.layers:
            if getattr(layer, "engram", None) is not None:
                layer.engram.reset_parameters(torch.Generator().manual_seed(config.seed))
    else:
        weights = iter_safetensors(safetensors_files(model_path), device, progress)
        fmt = fp8_format_from_hf(load_config(model_path))
        if fmt is not None:         # block-scaled FP8 checkpoint: codes and scales load as stored
            from tierserve.quant.fp8_linear import pair_fp8_weights
            model.use_fp8_checkpoint(fmt.block_size, fmt.pow2_scale)
            weights = pair_fp8_weights(weights)
        model.load_weights(weights)
    if config.quantization == "fp8":
        from tierserve.quant.fp8_linear import quantize_model_fp8
        quantize_model_fp8(model)
        if config.fp8_lm_head:
            if not hasattr(model, "quantize_lm_head_fp8"):
                raise ValueError(f"fp8_lm_head is not supported for {type(model).__name__} (Llama family only)")
            model.quantize_lm_head_fp8()
    if device.type == "cuda" and config.fused_ops and hasattr(model, "enable_fused"):
        model.enable_fused(gemv=config.decode_gemv)
    return model


def init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights from ``seed`` alone: the same on every build (CPU weights from a CPU generator,
    device weights from a device generator), whatever ran before in the process."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev_gen: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if ".engram." in name:          # Engram resets its own; the backbone is the same whatever the placement
            continue
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif p.device.type == "cpu":
            p.data.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0, 0.02, generator=g))
        else:
            if p.device not in dev_gen:
                dev_gen[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.data.normal_(0, 0.02, generator=dev_gen[p.device])
