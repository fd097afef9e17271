"""``Fp8Linear``: an ``nn.Linear`` whose weight is block-scaled FP8 (see ``tierserve.quant.fp8``).

Forward dispatch (output dtype = input dtype):
- CPU: dequantise, ``F.linear`` (correct, slow).
- CUDA, rows <= ``small_m_max`` (decode): the Triton FP8 GEMV / skinny GEMM (weights read once, as fp8); one
  row: the CUDA-core row GEMV (``triton_fp8_gemv_rows``; H200, Llama-8B layers: 75 against 101 us a layer for
  ``fp8_gemm``, bf16 cuBLAS 116; ``TIERSERVE_FP8_GEMV=gemm`` keeps ``fp8_gemm`` for one row too).
- CUDA, more rows (prefill): ``prefill="auto"`` tries ``F.scaled_mm`` (W8A8: activations quantised per
  token per 128 channels, SM90, N and K multiples of 128), checked once per layer against the emulated
  W8A8 reference; otherwise (or ``prefill="dequant"``) dequantise to the input dtype and ``F.linear``.

Building: ``quantize_linear`` / ``quantize_model_fp8`` quantise bf16/fp32 layers in place;
``load_fp8_weight`` + ``Fp8Linear.load_shard`` take checkpoint ``*.weight`` (float8_e4m3fn) +
``*.weight_scale_inv`` tensors, also into fused (qkv, gate_up) layers: see ``fp8_row_block``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.quant.fp8 import (
    DEFAULT_BLOCK,
    FP8_DTYPE,
    dequantize_fp8_blockwise,
    fp8_w8a8_ref,
    quantize_fp8_blockwise,
    scale_shape,
    scaled_mm_blockwise,
    scaled_mm_supported,
)

PREFILL_MODES = ("auto", "dequant", "scaled_mm")
SCALE_SUFFIXES = (".weight_scale_inv", ".scale")

GEMV_MODES = ("rows", "gemm")
GEMV_MODE = os.environ.get("TIERSERVE_FP8_GEMV", "rows")                # read once: runs per layer per step
if GEMV_MODE not in GEMV_MODES:
    raise ValueError(f"TIERSERVE_FP8_GEMV must be one of {GEMV_MODES}, got {GEMV_MODE!r}")
ROW_GEMV = GEMV_MODE == "rows"


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block_size: tuple[int, int] = DEFAULT_BLOCK, device=None, dtype: torch.dtype | None = None,
                 pow2_scale: bool = False, small_m_max: int = 16, prefill: str = "auto") -> None:
        super().__init__()
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}; got {prefill!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.pow2_scale = pow2_scale          # also used for activation scales on the scaled_mm path
        self.small_m_max = small_m_max
        self.prefill = prefill
        self._scaled_mm_ok: bool | None = None     # None: not yet checked on this layer
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("scale_inv", torch.ones(scale_shape((out_features, in_features), self.block_size),
                                                     dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, pow2_scale={self.pow2_scale}")

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would turn the fp8 codes and fp32 scales into the model dtype:
        # only device moves apply to them.
        keep = {"qweight": self.qweight, "scale_inv": self.scale_inv}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                fixed = torch.empty_like(old, device=new.device) if old.is_meta else old.to(new.device)
                setattr(self, name, fixed)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8_blockwise(self.qweight, self.scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if x.device.type != "cuda":
            y = F.linear(x2, self.dequantize(x.dtype), bias)
        elif x2.shape[0] <= self.small_m_max:
            y = self._decode(x2, bias)
        else:
            y = self._prefill(x2, bias)
        return y.view(*lead, self.out_features)

    def row_partials(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x [1, in]`` on CUDA: the row GEMV's unsummed split-K partials ``[split, 1, out]`` fp32 (the caller sums
        them in split order and adds ``self.bias``, as ``models.layers.triton_qkv_rope`` does), or None -- nothing
        launched -- where this layer's decode would not take the row GEMV or takes it in one split."""
        if not self._row_decode(x):
            return None
        from tierserve.quant.triton_fp8_gemv_rows import fp8_gemv_rows
        return fp8_gemv_rows(x, self.qweight, self.scale_inv, None, self.block_size, x.dtype, partials_only=True)

    def _row_decode(self, x: torch.Tensor) -> bool:
        """Does ``forward(x)`` take the row GEMV (one row on CUDA)?"""
        return x.device.type == "cuda" and x.dim() == 2 and x.shape[0] == 1 and ROW_GEMV and self.small_m_max >= 1

    def _decode(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 1 and ROW_GEMV:
            from tierserve.quant.triton_fp8_gemv_rows import fp8_gemv_rows
            return fp8_gemv_rows(x, self.qweight, self.scale_inv, bias, self.block_size, x.dtype)
        from tierserve.quant.triton_fp8_gemv import fp8_gemm
        return fp8_gemm(x, self.qweight, self.scale_inv, bias, self.block_size, x.dtype)

    def _prefill(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        usable = self.block_size == (128, 128) and scaled_mm_supported(x.device, self.out_features,
                                                                        self.in_features)
        if self.prefill == "scaled_mm" and not usable:
            raise RuntimeError(f"prefill='scaled_mm' needs SM90, 128x128 blocks and N, K multiples of 128 "
                               f"(layer [{self.out_features}, {self.in_features}], block {self.block_size})")
        if self.prefill != "dequant" and usable and self._scaled_mm_ok is not False:
            if self._scaled_mm_ok is None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._scaled_mm_ok = self._check_scaled_mm(x)
            if self._scaled_mm_ok:
                y = scaled_mm_blockwise(x, self.qweight, self.scale_inv, x.dtype, self.pow2_scale)
                return y + bias if bias is not None else y
        from tierserve.quant.triton_fp8_gemv import fp8_dequant
        return F.linear(x, fp8_dequant(self.qweight, self.scale_inv, self.block_size, x.dtype), bias)

    def _check_scaled_mm(self, x: torch.Tensor) -> bool:
        """One-off check of the cuBLAS block-scaled path (scale layouts are easy to get wrong)."""
        xs = x[:64]
        try:
            got = scaled_mm_blockwise(xs, self.qweight, self.scale_inv, x.dtype, self.pow2_scale).float()
        except (RuntimeError, TypeError, ValueError) as e:
            if self.prefill == "scaled_mm":
                raise
            warnings.warn(f"F.scaled_mm block-scaled FP8 unavailable ({e}); prefill dequantises instead")
            return False
        want = fp8_w8a8_ref(xs, self.qweight, self.scale_inv, self.pow2_scale)
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        if err > 1e-2:
            msg = f"F.scaled_mm block-scaled FP8 disagrees with the reference (rel. error {err:.3g})"
            if self.prefill == "scaled_mm":
                raise RuntimeError(msg)
            warnings.warn(msg + "; prefill dequantises instead")
            return False
        return True

    # ---- checkpoint loading ---------------------------------------------------------------------
    @torch.no_grad()
    def load_shard(self, qweight: torch.Tensor, scale_inv: torch.Tensor, row_offset: int = 0,
                   shard_block: tuple[int, int] = DEFAULT_BLOCK) -> None:
        """Copy one checkpoint tensor (rows ``[row_offset, row_offset + n)`` of this layer) and its scales.
        Same block size and a row offset on a block boundary: bytes and scales are copied as they are.
        A per-row-scaled layer (``block_size == (1, bk)``) takes any offset: the shard's block scales are
        repeated onto its rows. Both are exact; anything else is an error naming the shapes."""
        n, k = qweight.shape
        bn, bk = self.block_size
        if k != self.in_features or row_offset < 0 or row_offset + n > self.out_features:
            raise ValueError(f"FP8 shard [{n}, {k}] at row {row_offset} does not fit a "
                             f"[{self.out_features}, {self.in_features}] layer")
        if shard_block[1] != bk or tuple(scale_inv.shape) != scale_shape((n, k), shard_block):
            raise ValueError(f"FP8 shard [{n}, {k}] with scales {tuple(scale_inv.shape)} (block {shard_block}) "
                             f"does not match this layer's block {self.block_size}")
        s = scale_inv.to(self.scale_inv.device, torch.float32)
        if bn == 1:
            self.scale_inv[row_offset:row_offset + n] = s.repeat_interleave(shard_block[0], 0)[:n]
        elif bn == shard_block[0] and row_offset % bn == 0 and (n % bn == 0 or row_offset + n == self.out_features):
            self.scale_inv[row_offset // bn:row_offset // bn + s.shape[0]] = s
        else:
            raise ValueError(f"FP8 shard at row {row_offset} with {n} rows is not aligned to {bn}-row scale "
                             "blocks: build this fused layer with block_size=(1, "
                             f"{bk}) (see fp8_row_block)")
        self.qweight[row_offset:row_offset + n] = qweight.to(self.qweight.device)


def fp8_row_block(shard_rows: Iterable[int], block: int = 128) -> int:
    """Row granularity of the scales of a fused layer made of shards with these row counts (in order).

    The simplest exact rule: if every shard starts on a block boundary (all offsets multiples of
    ``block``), keep the checkpoint's ``block``-row scales and copy bytes and scales as they are;
    otherwise give the fused layer one scale per row (``1``), i.e. repeat each shard's block scales
    onto its rows: +4/bk bytes per weight (3% of the fp8 bytes at bk=128), no requantisation, and the
    Triton decode kernel takes it unchanged (only the scaled_mm prefill path needs 128-row blocks)."""
    off = 0
    for r in shard_rows:
        if off % block:
            return 1
        off += r
    return block


def load_fp8_weight(name: str, tensor: torch.Tensor, scale_inv: torch.Tensor,
                    block_size: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a checkpoint's FP8 ``name`` (``*.weight``) and its ``*.weight_scale_inv``; return
    ``(qweight float8_e4m3fn, scale_inv fp32)``. 8-bit integer weight storage is reinterpreted as e4m3;
    scales may be fp32/bf16, ``float8_e8m0fnu`` or raw UE8M0 bytes (uint8), all converted exactly."""
    if tensor.dim() != 2:
        raise ValueError(f"{name}: an FP8 weight must be 2-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype in (torch.uint8, torch.int8):
        tensor = tensor.view(FP8_DTYPE)
    if tensor.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: expected float8_e4m3fn (or uint8) data, got {tensor.dtype}")
    want = scale_shape(tuple(tensor.shape), block_size)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}_scale_inv: shape {tuple(scale_inv.shape)}, but a {tuple(tensor.shape)} weight "
                         f"with {block_size[0]}x{block_size[1]} blocks needs {want}")
    if scale_inv.dtype == torch.uint8:              # raw UE8M0 exponent bytes: 2 ** (byte - 127)
        return tensor, torch.exp2(scale_inv.float() - 127.0)
    return tensor, scale_inv.float()


def _scale_owner(name: str) -> str | None:
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None


def pair_fp8_weights(weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Stream ``(name, tensor, scale_inv or None)``: each FP8 ``X.weight`` is held back until its scale
    (``X.weight_scale_inv``, or ``X.scale`` as DeepSeek-V4's release names it) arrives -- they may sit in
    different shards, in either order; other tensors pass through. Raises if an FP8 weight or a
    ``weight_scale_inv`` is left without its partner (a lone ``X.scale`` is passed through at the end)."""
    held_w: dict[str, torch.Tensor] = {}
    held_s: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in weights:
        owner = _scale_owner(name)
        if owner is not None:
            if owner in held_w:
                yield owner, held_w.pop(owner), t
            else:
                held_s[owner] = (name, t)
        elif name.endswith(".weight") and t.dtype == FP8_DTYPE:
            if name in held_s:
                yield name, t, held_s.pop(name)[1]
            else:
                held_w[name] = t
        else:
            yield name, t, None
    lone_s = [n for n, _ in held_s.values() if n.endswith("_scale_inv")]
    if held_w or lone_s:
        raise ValueError(f"FP8 checkpoint: {len(held_w)} weight(s) without a scale and {len(lone_s)} "
                         f"weight_scale_inv(s) without a weight, e.g. {sorted(held_w)[:3] + sorted(lone_s)[:3]}")
    for n, t in held_s.values():
        yield n, t, None


@torch.no_grad()
def quantize_linear(linear: nn.Linear, block_size: tuple[int, int] = DEFAULT_BLOCK,
                    pow2_scale: bool = False, **kwargs) -> Fp8Linear:
    """An ``Fp8Linear`` holding ``linear``'s weight quantised (and its bias as is)."""
    w = linear.weight
    m = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, block_size,
                  device=w.device, dtype=w.dtype, pow2_scale=pow2_scale, **kwargs)
    m.qweight, m.scale_inv = quantize_fp8_blockwise(w, block_size, pow2_scale)
    if linear.bias is not None:
        m.bias.copy_(linear.bias)
    return m


def quantize_model_fp8(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "embed"),
                       block_size: tuple[int, int] = DEFAULT_BLOCK, pow2_scale: bool = False,
                       **kwargs) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name contains none of ``skip`` by an ``Fp8Linear``,
    in place, one at a time (peak memory: the model plus one layer). Returns ``model``."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not any(s in n for s in skip)]
    on_cuda = False
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        on_cuda |= old.weight.is_cuda
        setattr(parent, attr, quantize_linear(old, block_size, pow2_scale, **kwargs))
        del old
    if on_cuda:
        torch.cuda.empty_cache()      # so that KV sizing from free memory sees the bytes we gave back
    return model
