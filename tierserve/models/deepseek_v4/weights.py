"""Load a DeepSeek-V4 checkpoint directory (config.json + safetensors) into ``DeepseekV4Model``.

Key names: the public layout, with or without a leading ``model.`` (what transformers'
``save_pretrained`` writes, too)::

    [model.]embed.weight | [model.]embed_tokens.weight       -> embed.weight
    head.weight | lm_head.weight                              -> head.weight
    [model.]hc_head_{fn,base,scale} | [model.]hc_head.hc_{fn,base,scale} -> hc_head.{fn,base,scale}
    [model.]layers.N.hc_{attn,ffn}_{fn,base,scale}            -> layers.N.hc_{attn,ffn}.{fn,base,scale}
    [model.]layers.N.attn.{wq_a,q_norm,wq_b,wkv,norm,wo_a,wo_b,attn_sink}
    [model.]layers.N.attn.compressor.{wkv,wgate,ape,norm}
    [model.]layers.N.attn.indexer.{wq_b,weights_proj} and .indexer.compressor.{wkv,wgate,ape,norm}
    [model.]layers.N.ffn.gate.{weight,bias,tid2eid}, .ffn.experts.E.w{1,2,3}, .ffn.shared_experts.w{1,2,3}
    [model.]layers.N.{attn_norm,ffn_norm}.weight, [model.]norm.weight

Everything else maps by identity; ``mtp.*`` (multi-token prediction) keys are skipped. A weight with
a ``.scale`` / ``.weight_scale_inv`` sibling is dequantised on load (``quant.py``): FP8 e4m3 with block
scales, or packed FP4 e2m1 with 1 x 32 UE8M0 scales. Missing or unexpected keys and shape mismatches
raise ``ValueError`` naming the keys.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tierserve.loader.hf import safetensors_files
from tierserve.models.deepseek_v4.config import DeepseekV4Config
from tierserve.models.deepseek_v4.model import DeepseekV4Model
from tierserve.models.deepseek_v4.quant import dequantize_fp4, dequantize_fp8, is_fp4

_SCALE_SUFFIXES = (".weight_scale_inv", ".scale")
_RENAMES = [
    (re.compile(r"^embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^lm_head\.weight$"), "head.weight"),
    (re.compile(r"^hc_head_(fn|base|scale)$"), r"hc_head.\1"),
    (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head.\1"),
    (re.compile(r"^(layers\.\d+)\.hc_(attn|ffn)_(fn|base|scale)$"), r"\1.hc_\2.\3"),
]


def module_name(key: str) -> str | None:
    """Model parameter name of a checkpoint key; ``None`` for keys that are not loaded (``mtp.*``)."""
    name = key.removeprefix("model.")
    if name.startswith("mtp."):
        return None
    for pat, repl in _RENAMES:
        if pat.match(name):
            return pat.sub(repl, name)
    return name


def _scale_key(key: str, keys: set[str]) -> str | None:
    if not key.endswith(".weight"):
        return None
    base = key[: -len(".weight")]
    for suffix in _SCALE_SUFFIXES:
        if base + suffix in keys:
            return base + suffix
    return None


class _Checkpoint:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.handles, self.where = [], {}
        for f in safetensors_files(path):
            h = safe_open(str(f), framework="pt", device="cpu")
            self.handles.append(h)
            for k in h.keys():
                self.where[k] = h

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def read_weights(path: str | Path, cfg: DeepseekV4Config):
    """Yield ``(parameter name, fp32-or-native tensor)`` for every loadable checkpoint tensor."""
    ckpt = _Checkpoint(Path(path))
    keys = ckpt.keys()
    scales = {s for k in keys if (s := _scale_key(k, keys)) is not None}
    block = tuple(cfg.quantization.get("weight_block_size") or (128, 128))
    for key in sorted(keys - scales):
        name = module_name(key)
        if name is None:
            continue
        t = ckpt.get(key)
        skey = _scale_key(key, keys)
        if skey is not None:
            try:
                t = dequantize_fp4(t, ckpt.get(skey)) if is_fp4(t) else dequantize_fp8(t, ckpt.get(skey), block)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        elif t.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8) and not name.endswith("tid2eid"):
            raise ValueError(f"{key}: quantised weight ({t.dtype}) without a .scale / .weight_scale_inv")
        yield name, t


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
               ) -> DeepseekV4Model:
    """Build the model of ``path/config.json`` and fill it from the checkpoint (dequantising FP8/FP4)."""
    path = Path(path)
    cfg = DeepseekV4Config.from_json(path)
    with torch.device("meta"):
        model = DeepseekV4Model(cfg)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, t in read_weights(path, cfg):
            p = params.get(name)
            if p is None:
                unexpected.append(name)
                continue
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"checkpoint tensor for {name}: shape {tuple(t.shape)}, model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype) if p.is_floating_point() else t.to(p.device))
            loaded.add(name)
        if "head.weight" not in loaded and cfg.tie_word_embeddings and "embed.weight" in loaded:
            params["head.weight"].copy_(params["embed.weight"])
            loaded.add("head.weight")
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the DeepSeek-V4 model: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    if dtype != torch.float32:
        model.cast(dtype)
    return model.eval()
