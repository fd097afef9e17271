"""A prefill chunk over cached context, as two flash-attention calls merged by their log-sum-exp.

A chunk of ``n`` new tokens at positions ``start .. start+n-1`` attends to (a) every cached key before
``start`` -- no mask at all, so the query heads of one KV-head group fold into the query length and the
cached keys are read once per KV head, not once per query head -- and (b) its own new keys, causally, which is
a square causal attention. Each part returns its output and per-row log-sum-exp; the exact softmax over the
union is their LSE-weighted sum. On CUDA both parts run cuDNN's fused attention or PyTorch's flash-attention
kernel (the one SDPA uses; ``choose_kernel`` picks one per process), which reach a far larger share of the
tensor-core peak than our paged prefill kernel on long contexts (flash: ~336 TFLOP/s in a 128k prefill on the
H200, ``prefill-profile-h200.json``); the
cached keys are first gathered from their pages into one contiguous block per layer (a copy of
``2 x start x Hkv x D`` values, small next to the attention FLOPs). ``attend_lse`` has a plain-PyTorch
implementation for other devices (and the tests).

Spilled pages take part once staged on the device (``gather_context``'s ``host_cache``), so a chunk over a
partly spilled context runs the same two flash calls on the same values as over an all-GPU one (bit-identical:
the staged paged prefill kernel it used before summed in another order, and greedy tokens of tiered runs
drifted from the all-GPU run on the H200). Not for sliding windows or FP8 pages (the Triton prefill kernels
handle those).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("tierserve")
_FLASH_OFF: list = []      # non-empty once the flash op failed
_ROWS = 1024               # query rows per slice of the plain path
_CHOSEN: list = []         # the CUDA kernel in use once chosen: ["cudnn"] or ["flash"]
BACKENDS = ("auto", "cudnn", "flash")


def flash_ok(q: torch.Tensor) -> bool:
    """Whether the CUDA flash kernel takes these queries (dtype and head size)."""
    d = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256


def _flash(q, k, v, scale: float, causal: bool):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]


def _cudnn(q, k, v, scale: float, causal: bool):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()      # one layout for every call (no refusals later)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                   scale=scale)[:2]
    return out, lse.reshape(q.shape[:-1]).float()


KERNELS = {"cudnn": _cudnn, "flash": _flash}


def choose_kernel(q, k, v, scale: float, causal: bool, kernels=None) -> str:
    """The CUDA kernel every prefix / chunk attention of this process uses, picked once (so a chunk's
    attention never depends on when it ran: tiered and all-GPU runs stay bit-identical).
    ``TIERSERVE_PREFILL_ATTN`` = ``flash`` (default) or ``auto``: cuDNN's fused attention if it runs these
    inputs and agrees with the flash kernel (outputs within 2e-2, log-sum-exps within 1e-3), else flash;
    ``cudnn`` forces it (still falling back to flash if it fails to run). Flash stays the default until
    cuDNN is measured on the H200: it builds an execution plan per new shape, and chunk and prompt lengths
    vary."""
    kernels = kernels or KERNELS
    want = os.environ.get("TIERSERVE_PREFILL_ATTN", "flash")
    if want not in BACKENDS:
        raise ValueError(f"TIERSERVE_PREFILL_ATTN must be one of {BACKENDS}, got {want!r}")
    if want == "flash":
        return "flash"
    try:
        o_c, l_c = kernels["cudnn"](q, k, v, scale, causal)
    except RuntimeError as e:
        log.info("cuDNN attention does not run here (%s); prefill attention uses the flash kernel", e)
        return "flash"
    if want == "cudnn":
        return "cudnn"
    o_f, l_f = kernels["flash"](q, k, v, scale, causal)
    d_out = float((o_c.float() - o_f.float()).abs().max())
    d_lse = float((l_c.float() - l_f.float()).abs().max())
    if d_out <= 2e-2 and d_lse <= 1e-3:
        return "cudnn"
    log.warning("cuDNN attention differs from flash (max |d out| %.3g, |d lse| %.3g); using flash", d_out, d_lse)
    return "flash"


def _cuda_attend(q, k, v, scale: float, causal: bool):
    if not _CHOSEN:
        _CHOSEN.append(choose_kernel(q, k, v, scale, causal))
        log.info("prefill attention kernel: %s", _CHOSEN[0])
    try:
        return KERNELS[_CHOSEN[0]](q, k, v, scale, causal)
    except RuntimeError as e:
        if _CHOSEN[0] == "flash":
            raise
        log.warning("cuDNN attention failed (%s); the flash kernel from now on", e)
        _CHOSEN[0] = "flash"
        return _flash(q, k, v, scale, causal)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [(B,) H, Lq, D], k/v [(B,) H, Lk, D] (same H) -> (out like q in q's dtype, lse [(B,) H, Lq] fp32,
    natural log). ``causal``: square attention (Lq == Lk), row i sees keys 0..i. On CUDA: cuDNN's or
    PyTorch's flash kernel (``choose_kernel``)."""
    if flash_ok(q) and not _FLASH_OFF:
        batched = q.dim() == 4
        try:
            out, lse = _cuda_attend(q if batched else q[None], k if batched else k[None],
                                    v if batched else v[None], scale, causal)
            return (out, lse) if batched else (out[0], lse[0])
        except RuntimeError as e:          # this torch build refuses: plain math from now on (slow)
            log.warning("flash attention with log-sum-exp is off (%s); using plain attention", e)
            _FLASH_OFF.append(True)
    outs, lses = [], []
    for r0 in range(0, q.shape[-2], _ROWS):      # query rows in slices: scores stay [.., rows, Lk]
        s = (q[..., r0:r0 + _ROWS, :].float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(r0, r0 + s.shape[-2], device=s.device)[:, None]
            s = s.masked_fill(torch.arange(s.shape[-1], device=s.device)[None, :] > rows, float("-inf"))
        lses.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.softmax(s, dim=-1) @ v.float())
    return torch.cat(outs, dim=-2).to(q.dtype), torch.cat(lses, dim=-1)


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from each part's output and log-sum-exp
    (o [..., L, D], lse [..., L])."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(o1.dtype)


def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, length: int,
                   host_cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first ``length`` cached positions of one sequence, contiguous per KV head:
    caches [N, page, Hkv, D], ``pages`` its page ids (at least ceil(length / page)). ``host_cache``: (K, V) of
    pages spilled to CPU RAM and staged on the device, [M, page, Hkv, D]; page ids >= N read entry id - N there.
    The gathered values are exact copies either way, so a chunk's attention does not depend on where its
    context's pages live (tiers are lossless)."""
    page, hkv, d = k_cache.shape[1:]
    ids = pages[:-(-length // page)]

    def rows(cache: torch.Tensor, staged: torch.Tensor | None) -> torch.Tensor:
        if staged is None:
            got = cache[ids]
        else:
            n_dev = cache.shape[0]
            on_host = (ids >= n_dev)[:, None, None, None]
            got = torch.where(on_host, staged[(ids - n_dev).clamp(min=0, max=staged.shape[0] - 1)],
                              cache[ids.clamp(max=n_dev - 1)])
        return got.reshape(-1, hkv, d)[:length].transpose(0, 1).contiguous()

    hk, hv = host_cache if host_cache is not None else (None, None)
    return rows(k_cache, hk), rows(v_cache, hv)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor | None,
                    ctx_v: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [n, Hq, D], the chunk's own k/v [n, Hkv, D], cached context ctx_k/ctx_v [Hkv, L, D] (or None)
    -> [n, Hq, D]: causal attention over context + own keys."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qh = q.transpose(0, 1)                                                       # [Hq, n, D]
    own_k = k.transpose(0, 1).repeat_interleave(g, dim=0)                        # [Hq, n, D]
    own_v = v.transpose(0, 1).repeat_interleave(g, dim=0)
    o_own, lse_own = attend_lse(qh, own_k, own_v, scale, causal=True)
    if ctx_k is None or ctx_k.shape[1] == 0:
        return o_own.transpose(0, 1)
    folded = qh.reshape(hkv, g * n, d)                                           # heads of a group share keys
    o_ctx, lse_ctx = attend_lse(folded, ctx_k, ctx_v, scale, causal=False)
    out = merge_lse(o_ctx.reshape(hq, n, d), lse_ctx.reshape(hq, n), o_own, lse_own)
    return out.transpose(0, 1)
