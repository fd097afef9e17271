"""Checkpoint loading of the Llama-family decoder (``models/llama.py``): HF names into the fused q/k/v and gate/up
projections, FP8 checkpoints (codes + ``weight_scale_inv``) into ``Fp8Linear`` shards, the expected names."""
from __future__ import annotations

from typing import Iterable

import torch


class LlamaWeights:
    """Mixin of ``LlamaForCausalLM``: needs ``cfg``, ``layers``, ``lm_head`` and the ``nn.Module`` API."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; checks names and shapes."""
        params = dict(self.named_parameters())
        cfg = self.cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        I = cfg.intermediate_size
        fused = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
                 "gate_proj": ("gate_up_proj", 0, I), "up_proj": ("gate_up_proj", I, I)}
        loaded: set[str] = set()
        for item in weights:            # (name, tensor) or, from an FP8 checkpoint, (name, codes, scale_inv)
            name, tensor, scale_inv = item if len(item) == 3 else (*item, None)
            if "rotary_emb" in name:
                continue
            if ".engram." in name:
                i, rest = name.removeprefix("model.layers.").split(".engram.", 1)
                eng = self.layers[int(i)].engram if int(i) < len(self.layers) else None
                if eng is None:
                    raise ValueError(f"checkpoint tensor {name!r}: layer {i} has no Engram in config.json")
                eng.load_tensor(rest, tensor)
                loaded.add(name)
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            target, rows = name.removeprefix("model."), None
            for part, (dst, start, n) in fused.items():
                if f".{part}." in target:
                    target, rows = target.replace(part, dst), (start, n)
                    break
            if scale_inv is not None:        # FP8 codes + block scales into an Fp8Linear (shard of a fused one)
                self._load_fp8(name, target, rows, tensor, scale_inv)
                loaded.add(name)
                continue
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
            dst = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                                 f"model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name)
        expected = set(self.expected_weight_names())
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")

    def _load_fp8(self, name: str, target: str, rows, codes: torch.Tensor, scale_inv: torch.Tensor) -> None:
        from tierserve.quant.fp8_linear import Fp8Linear, load_fp8_weight

        mod = self.get_submodule(target.removesuffix(".weight")) if target.endswith(".weight") else None
        if not isinstance(mod, Fp8Linear):
            raise ValueError(f"checkpoint tensor {name!r} is FP8 but {target!r} is not an FP8 layer "
                             "(is quantization_config missing from config.json?)")
        block = self.fp8_block
        q, s = load_fp8_weight(name, codes, scale_inv, block)
        mod.load_shard(q, s, rows[0] if rows else 0, shard_block=block)

    def use_fp8_checkpoint(self, block_size: tuple[int, int], pow2_scale: bool = False) -> None:
        """Turn the projections into empty ``Fp8Linear`` layers that take a block-scaled FP8 checkpoint as
        stored (embeddings and the LM head stay in the model dtype). Fused layers whose shards do not start
        on a ``block_size[0]`` row boundary get per-row scales (exact, see quant/fp8_linear.py)."""
        from tierserve.quant.fp8_linear import Fp8Linear, fp8_row_block

        self.fp8_block = tuple(block_size)
        cfg, bn, bk = self.cfg, block_size[0], block_size[1]
        shards = {"qkv_proj": [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,
                  "gate_up_proj": [cfg.intermediate_size] * 2}
        for layer in self.layers:
            for parent, attr in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                old = getattr(parent, attr)
                rb = fp8_row_block(shards[attr], bn) if attr in shards else bn
                setattr(parent, attr, Fp8Linear(old.in_features, old.out_features, old.bias is not None, (rb, bk),
                                                device=old.weight.device, dtype=old.weight.dtype,
                                                pow2_scale=pow2_scale))
        self.gemv = False

    def expected_weight_names(self) -> list[str]:
        cfg, names = self.cfg, ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                      p + "self_attn.o_proj.weight"]
            names += [p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
            for n in ("q_proj", "k_proj", "v_proj"):
                names.append(p + f"self_attn.{n}.weight")
                if cfg.attention_bias:
                    names.append(p + f"self_attn.{n}.bias")
            if cfg.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            if self.layers[i].engram is not None:
                names += [p + "engram." + n for n in self.layers[i].engram.weight_names()]
        return names
