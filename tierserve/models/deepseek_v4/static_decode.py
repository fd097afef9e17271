"""The graph-capturable DeepSeek-V4 decode step: one new token for each of the rows ``0..B-1`` of a
``StaticState`` (``static_state.py``), everything in place, no host sync, no data-dependent shape.

Same math as ``decode_batch`` (``batch.py``), arranged so that every shape depends only on ``B`` and the
buffers' capacity and every position-dependent choice is made on the device:

* the new K=V row goes to ring row ``p % W``; attention reads all ``W`` ring rows, masking those not yet
  written (``row > p``; ring order instead of position order changes only the summation order);
* each compressor writes the token's projections to open-window row ``p % m`` and pools the window for
  *every* row; a row whose window closes (``p % m == m - 1``) writes entry ``(p + 1) // m - 1`` into its
  page(s) (``EntryPool.scatter`` through the row's page table, ``paged_state.py``), the others write the
  pool's scratch page; the Ca half of the window is kept with ``torch.where``;
* entries are read through the page table (``EntryPool.gather_first`` for full ranges: whole pages;
  ``EntryPool.gather`` for the CSA picks): HCA reads ``T`` entries with a mask ``j < (p + 1) // m``;
  CSA scores ``T`` indexer keys, masks the missing ones to ``-inf``, takes a fixed top-``min(index_topk,
  T)`` and masks the picks past the row's count (``T``: ``capacity``, or ``max_tokens // m``)
  (gathering the stored rows first, so MODEL1 entries are dequantised only for the picks). Entries past
  a row's count map to the scratch page or to not-yet-written rows of its pages; they are zeroed;
* the routed experts run through ``MoE.forward_decode`` (Triton kernels by expert index), and with
  ``fused`` (default: on the GPU) mHC (``mhc_triton.py``: 4 + 1 launches instead of ~60 with the
  Sinkhorn iterations), the RMS norms and rope (``fused_ops.py``) are one Triton launch each instead of
  ~8 / ~12 tiny kernels; the rope
  cos / sin of a step are computed once per rope setting, not per layer;
* ``positions`` advance by one in place, so consecutive replays need no host work.

Rows past the live batch (padding up to a graph bucket) run on whatever their slot holds; a free slot's
page-table row points at the scratch page only (``StaticState.clear``), so their writes land there (as do
entry indices past the capacity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tierserve.models.deepseek_v4 import fused_ops
from tierserve.models.deepseek_v4.mhc import HyperConnection
from tierserve.models.deepseek_v4.moe_triton import triton
from tierserve.models.deepseek_v4.norm import rms_unweighted
from tierserve.models.deepseek_v4.rope import apply_rope
from tierserve.models.deepseek_v4.static_state import CompBuffers, LayerBuffers, StaticState


class Ops:
    """The step's norms and rope: Triton kernels (``fused``) or the reference modules; cos / sin memo."""

    def __init__(self, fused: bool) -> None:
        self.fused = fused
        self.memo: dict = {}

    def norm(self, mod, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.rms_norm(x, mod.weight, mod.eps) if self.fused else mod(x)

    def unweighted(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return fused_ops.rms_norm(x, None, eps) if self.fused else rms_unweighted(x, eps)

    def rope(self, x, cos, sin, inverse: bool = False) -> torch.Tensor:
        return fused_ops.rope(x, cos, sin, inverse) if self.fused else apply_rope(x, cos, sin, inverse)

    def cos_sin(self, spec, positions: torch.Tensor, key, dtype: torch.dtype):
        """``spec.cos_sin(positions, dtype)``; ``key`` names the positions (the same within a step)."""
        k = (spec, key, dtype)
        if k not in self.memo:
            self.memo[k] = spec.cos_sin(positions, dtype)
        return self.memo[k]


def compressor_static(ops: Ops, comp, buf: CompBuffers, x: torch.Tensor, pos: torch.Tensor, store,
                      table: torch.Tensor) -> None:
    """One token per row (``x [B, hidden]`` at positions ``pos [B]``) into the compressor's buffers; a closing
    entry goes to its page (``table [B, P]``: the rows' page tables)."""
    B, m, d = x.shape[0], comp.ratio, comp.dim
    C = buf.pend_kv.shape[-1]
    at = (pos % m)[:, None, None].expand(-1, 1, C)
    kv, gate = buf.pend_kv[:B], buf.pend_gate[:B]
    kv.scatter_(1, at, comp.wkv(x)[:, None].to(kv.dtype))
    gate.scatter_(1, at, comp.wgate(x)[:, None].to(gate.dtype))
    closing = (pos % m) == m - 1
    g = gate + comp.ape
    if comp.overlap:
        slots_kv = torch.cat([buf.prev_kv[:B].to(kv.dtype), kv[:, :, d:]], dim=1)
        slots_gate = torch.cat([buf.prev_gate[:B].to(g.dtype), g[:, :, d:]], dim=1)
    else:
        slots_kv, slots_gate = kv, g
    weights = slots_gate.softmax(dim=1, dtype=torch.float32).to(slots_kv.dtype)
    pooled = ops.norm(comp.norm, (slots_kv * weights).sum(dim=1))
    entry = torch.div(pos + 1, m, rounding_mode="floor") - 1
    cos, sin = ops.cos_sin(comp.rope, entry.clamp(min=0) * m, ("entry", m), pooled.dtype)
    stored = store(ops.rope(pooled, cos, sin))
    buf.pool.scatter(table, entry, closing & (entry < buf.capacity), stored)
    if comp.overlap:
        c = closing[:, None, None]
        buf.prev_kv[:B].copy_(torch.where(c, kv[:, :, :d], buf.prev_kv[:B]))
        buf.prev_gate[:B].copy_(torch.where(c, g[:, :, :d].to(buf.prev_gate.dtype), buf.prev_gate[:B]))


def _project(ops: Ops, attn, x: torch.Tensor, pos: torch.Tensor):
    """``Attention._project`` through ``ops``."""
    q_lora = ops.norm(attn.q_norm, attn.wq_a(x))
    q = ops.unweighted(attn.wq_b(q_lora).view(x.shape[0], attn.n_heads, attn.head_dim), attn.eps)
    cos, sin = ops.cos_sin(attn.rope, pos, "token", x.dtype)
    kv = ops.rope(ops.norm(attn.norm, attn.wkv(x)), cos, sin)
    return q_lora, ops.rope(q, cos, sin), kv, cos, sin


def _output(ops: Ops, attn, o: torch.Tensor, cos, sin) -> torch.Tensor:
    """``Attention._output`` through ``ops``."""
    o = ops.rope(o, cos, sin, inverse=True)
    S = o.shape[0]
    grouped = o.reshape(S, attn.groups, -1).transpose(0, 1)
    w = attn.wo_a.weight.view(attn.groups, attn.group_rank, -1).transpose(1, 2)
    return attn.wo_b(torch.bmm(grouped, w).transpose(0, 1).reshape(S, -1))


def _index_scores(ops: Ops, indexer, x, q_lora, pos, keys: torch.Tensor) -> torch.Tensor:
    """``batch.index_scores`` through ``ops``: fp32 ``[B, T]``."""
    q = indexer.wq_b(q_lora).view(x.shape[0], indexer.n_heads, indexer.head_dim)
    cos, sin = ops.cos_sin(indexer.rope, pos, "token", q.dtype)
    q = ops.rope(q, cos, sin)
    s = F.relu(torch.matmul(q.float(), keys.float().transpose(1, 2))) * indexer.head_dim ** -0.5   # [B, H, T]
    w = indexer.weights_proj(x).float() * indexer.n_heads ** -0.5
    return (s * w.unsqueeze(-1)).sum(dim=1)


def attention_static(ops: Ops, attn, lb: LayerBuffers, x: torch.Tensor, pos: torch.Tensor,
                     table: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """``Attention.forward_step`` for one token per row, on the rows ``0..B-1`` of the buffers (entries read
    through the page tables ``table [B, P]``; only the first ``max_tokens // m`` with ``max_tokens``)."""
    B, dev = x.shape[0], x.device
    W, D = attn.window, attn.head_dim
    q_lora, q, kv, cos, sin = _project(ops, attn, x, pos)
    ring = lb.ring[:B]
    ring.scatter_(1, (pos % W)[:, None, None].expand(-1, 1, D), kv[:, None].to(ring.dtype))
    keys = ring
    valid = torch.arange(W, device=dev)[None, :] <= pos[:, None]                  # [B, W]
    if attn.compressor is not None:
        compressor_static(ops, attn.compressor, lb.comp, x, pos, attn.store_entries, table)
        T = lb.comp.capacity if max_tokens is None else max(1, min(lb.comp.capacity, max_tokens // attn.ratio))
        have = torch.div(pos + 1, attn.ratio, rounding_mode="floor")[:, None]       # complete entries
        present = torch.arange(T, device=dev)[None, :] < have                      # [B, T]
        picks = None                                                               # all T entries
        if attn.indexer is not None:
            compressor_static(ops, attn.indexer.compressor, lb.index, x, pos, attn.store_keys, table)
            ikeys = attn.read_keys(lb.index.pool.gather_first(table, T), x.dtype)
            scores = _index_scores(ops, attn.indexer, x, q_lora, pos, ikeys).masked_fill(~present, float("-inf"))
            k = min(attn.indexer.topk, T)
            if k < T:
                picks = scores.topk(k, dim=-1).indices                              # [B, k]
                present = picks < have
        pool = lb.comp.pool
        stored = pool.gather_first(table, T) if picks is None else pool.gather(table, picks)
        # entries past a row's count come from pages it does not own yet (or the scratch page): zero them,
        # so that stale bytes (e.g. a dequantised overflow) cannot turn a zero weight into NaN
        entries = attn.read_entries(stored, x.dtype)
        keys = torch.cat([keys, entries.masked_fill(~present[..., None], 0)], dim=1)
        valid = torch.cat([valid, present], dim=1)
    logits = torch.matmul(q, keys.transpose(1, 2)) * attn.scale                  # [B, H, K]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink = attn.attn_sink.to(logits.dtype).view(1, -1, 1).expand(B, -1, 1)
    logits = torch.cat([logits, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = logits.softmax(dim=-1)[..., :-1].to(keys.dtype)
    return _output(ops, attn, torch.matmul(probs, keys), cos, sin)


@torch.no_grad()
def decode_static(model, state: StaticState, ids: torch.Tensor, fused: bool | None = None,
                  max_tokens: int | None = None) -> torch.Tensor:
    """Logits ``[B, vocab]`` of the tokens ``ids [B]`` following the rows ``0..B-1`` of ``state``, whose
    buffers (and positions) are updated in place. ``fused``: Triton kernels for mHC's Sinkhorn, the norms,
    rope and the routed experts (default: on the GPU). ``max_tokens``: no live row has more tokens after
    this step, so only the first ``max_tokens // m`` entries of each compressor are read (a static bound:
    the slot decoder captures a graph per context limit); None: all ``max_len // m``."""
    if fused is None:
        fused = ids.is_cuda and triton is not None
    ops = Ops(fused)
    B = ids.shape[0]
    pos, table = state.positions[:B], state.page_table[:B]
    h = model.embed(ids).unsqueeze(1).expand(-1, model.config.hc_mult, -1).contiguous()
    for block, lb in zip(model.layers, state.layers):
        x, post, comb = block.hc_attn(h, fused=fused)
        out = attention_static(ops, block.attn, lb, ops.norm(block.attn_norm, x), pos, table, max_tokens)
        h = HyperConnection.merge(out, post, comb, h, fused=fused)
        x, post, comb = block.hc_ffn(h, fused=fused)
        out = block.ffn.forward_decode(ops.norm(block.ffn_norm, x), ids, use_triton=fused)
        h = HyperConnection.merge(out, post, comb, h, fused=fused)
    logits = model.head(ops.norm(model.norm, model.hc_head(h)))
    pos.add_(1)
    return logits
