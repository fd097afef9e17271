"""The graph-capturable DeepSeek-V4 decode step: one new token for each of the rows ``0..B-1`` of a
``StaticState`` (``static_state.py``), everything in place, no host sync, no data-dependent shape.

Same math as ``decode_batch`` (``batch.py``), arranged so that every shape depends only on ``B`` and the
buffers' capacity and every position-dependent choice is made on the device:

* the new K=V row goes to ring row ``p % W``; attention reads all ``W`` ring rows, masking those not yet
  written (``row > p``; ring order instead of position order changes only the summation order);
* each compressor writes the token's projections to open-window row ``p % m`` and pools the window for
  *every* row; a row whose window closes (``p % m == m - 1``) writes the entry at ``(p + 1) // m - 1``,
  the others write the scratch row; the Ca half of the window is kept with ``torch.where``;
* HCA reads all ``capacity`` entries with a mask ``j < (p + 1) // m``; CSA scores all ``capacity`` indexer
  keys, masks the missing ones to ``-inf``, takes a fixed top-``min(index_topk, capacity)`` and masks the
  picks past the row's count (gathering the stored rows first, so MODEL1 entries are dequantised only
  for the picks);
* the routed experts run through ``MoE.forward_decode`` (Triton kernels by expert index on the GPU), and
  on the GPU mHC's Sinkhorn projection is one Triton kernel (``mhc_triton.py``) instead of ~45 tiny ones;
* ``positions`` advance by one in place, so consecutive replays need no host work.

Rows past the live batch (padding up to a graph bucket) run on whatever their slot holds; their writes
stay in their own slot (entry indices past the capacity go to the scratch row).
"""
from __future__ import annotations

import torch

from tierserve.models.deepseek_v4.batch import index_scores
from tierserve.models.deepseek_v4.mhc import HyperConnection
from tierserve.models.deepseek_v4.moe_triton import triton
from tierserve.models.deepseek_v4.rope import apply_rope
from tierserve.models.deepseek_v4.static_state import CompBuffers, LayerBuffers, StaticState


def compressor_static(comp, buf: CompBuffers, x: torch.Tensor, pos: torch.Tensor, store) -> None:
    """One token per row (``x [B, hidden]`` at positions ``pos [B]``) into the compressor's buffers."""
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
    pooled = comp.norm((slots_kv * weights).sum(dim=1))
    entry = torch.div(pos + 1, m, rounding_mode="floor") - 1
    cos, sin = comp.rope.cos_sin(entry.clamp(min=0) * m, pooled.dtype)
    stored = store(apply_rope(pooled, cos, sin))
    target = torch.where(closing & (entry < buf.capacity), entry, torch.full_like(entry, buf.capacity))
    rest = stored.shape[1:]
    buf.entries[:B].scatter_(1, target.view(B, 1, *([1] * len(rest))).expand(B, 1, *rest), stored[:, None])
    if comp.overlap:
        c = closing[:, None, None]
        buf.prev_kv[:B].copy_(torch.where(c, kv[:, :, :d], buf.prev_kv[:B]))
        buf.prev_gate[:B].copy_(torch.where(c, g[:, :, :d].to(buf.prev_gate.dtype), buf.prev_gate[:B]))


def attention_static(attn, lb: LayerBuffers, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``Attention.forward_step`` for one token per row, on the rows ``0..B-1`` of the buffers."""
    B, dev = x.shape[0], x.device
    W, D = attn.window, attn.head_dim
    q_lora, q, kv, cos, sin = attn._project(x, pos)
    ring = lb.ring[:B]
    ring.scatter_(1, (pos % W)[:, None, None].expand(-1, 1, D), kv[:, None].to(ring.dtype))
    keys = ring
    valid = torch.arange(W, device=dev)[None, :] <= pos[:, None]                  # [B, W]
    if attn.compressor is not None:
        compressor_static(attn.compressor, lb.comp, x, pos, attn.store_entries)
        T = lb.comp.capacity
        have = torch.div(pos + 1, attn.ratio, rounding_mode="floor")[:, None]       # complete entries
        stored = lb.comp.entries[:B, :T]
        present = torch.arange(T, device=dev)[None, :] < have                      # [B, T]
        if attn.indexer is not None:
            compressor_static(attn.indexer.compressor, lb.index, x, pos, attn.store_keys)
            ikeys = attn.read_keys(lb.index.entries[:B, :T], x.dtype)
            scores = index_scores(attn.indexer, x, q_lora, pos, ikeys).masked_fill(~present, float("-inf"))
            k = min(attn.indexer.topk, T)
            if k < T:
                top = scores.topk(k, dim=-1).indices                                # [B, k]
                rest = stored.shape[2:]
                stored = stored.gather(1, top.view(B, k, *([1] * len(rest))).expand(B, k, *rest))
                present = top < have
        keys = torch.cat([keys, attn.read_entries(stored, x.dtype)], dim=1)
        valid = torch.cat([valid, present], dim=1)
    logits = torch.matmul(q, keys.transpose(1, 2)) * attn.scale                  # [B, H, K]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink = attn.attn_sink.to(logits.dtype).view(1, -1, 1).expand(B, -1, 1)
    logits = torch.cat([logits, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = logits.softmax(dim=-1)[..., :-1].to(keys.dtype)
    return attn._output(torch.matmul(probs, keys), cos, sin)


def decode_static(model, state: StaticState, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, vocab]`` of the tokens ``ids [B]`` following the rows ``0..B-1`` of ``state``, whose
    buffers (and positions) are updated in place."""
    B = ids.shape[0]
    pos = state.positions[:B]
    h = model.embed(ids).unsqueeze(1).expand(-1, model.config.hc_mult, -1).contiguous()
    fused = ids.is_cuda and triton is not None        # Sinkhorn in one launch (mhc_triton.py)
    for block, lb in zip(model.layers, state.layers):
        x, post, comb = block.hc_attn(h, fused=fused)
        out = attention_static(block.attn, lb, block.attn_norm(x), pos)
        h = HyperConnection.merge(out, post, comb, h)
        x, post, comb = block.hc_ffn(h, fused=fused)
        out = block.ffn.forward_decode(block.ffn_norm(x), ids)
        h = HyperConnection.merge(out, post, comb, h)
    logits = model.head(model.norm(model.hc_head(h)))
    pos.add_(1)
    return logits
