"""One forward pass for the decode rows of many sequences (``DeepseekV4Model.decode_batch``).

Every row is one new token of its own sequence, continuing its own immutable ``SequenceState``
(sequences of any, different lengths). What is per token and needs no state runs on the packed batch
``[B, ...]``: embeddings, mHC, norms, the q / kv / compressor / indexer projections, the MoE (the
tokens of all rows routed together, so each selected expert's weights are read once per step) and
the head. Attention runs over padded stacks of the rows' states, one set of kernels for all rows:

* window: the rings, left-padded to ``[B, L, D]``, with the new K=V row appended -> ``[B, L + 1, D]``;
  row ``b`` reads its last ``min(len_b + 1, W)`` columns (a length mask);
* compressed entries ``[B, T, D]`` and (CSA) indexer keys ``[B, T, Di]``, right-padded with a length
  mask (with kv_fp8 the stored MODEL1 rows are padded, then dequantised in one call); for a decode
  token every complete entry is visible, so HCA reads all ``T_b`` entries and CSA
  the indexer's top-``min(k, T)`` per row (padded slots score ``-inf`` and are masked afterwards);
* softmax with the per-head sink, inverse rope and the grouped output projection on the batch.

The state update stays per row but is vectorised: the compressors' open windows are left-padded and
the new projections appended in one op; the rows whose window closes with this token are pooled
together (``_close_windows``); the new states are views of the batch tensors (a row's window ring is
a slice of ``[B, L + 1, D]``), and a row's compressed entries are only copied when it gains one.

The arithmetic per row is the same as ``forward_step`` on that sequence alone, up to the summation
order of the batched matrix products and the masked (zero-weight) padding: fp32 log-probs agree
within a few 1e-6 (tests/models/test_deepseek_v4_batch.py). Prefill and multi-token chunks stay
one sequence per forward (``forward_step`` / ``prefill``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from tierserve.models.deepseek_v4.compressor import Compressor
from tierserve.models.deepseek_v4.mhc import HyperConnection
from tierserve.models.deepseek_v4.rope import apply_rope
from tierserve.models.deepseek_v4.state import CompressorState, LayerState, SequenceState


def _pad(ts: Sequence[torch.Tensor], left: bool) -> torch.Tensor:
    """``[B, max_len, ...]`` stack of ``ts``, zero-padded on the left or right (a plain stack when all
    lengths are equal: the common case, and cheaper)."""
    if len(ts) == 1:
        return ts[0].unsqueeze(0)
    n = ts[0].shape[0]
    if all(t.shape[0] == n for t in ts):
        return torch.stack(list(ts))
    return pad_sequence(list(ts), batch_first=True, padding_side="left" if left else "right")


# ---------------------------------------------------------------------------------------- compressor
def _close_windows(comp: Compressor, kv: torch.Tensor, gate: torch.Tensor, prev: list[tuple | None],
                   entry: list[int]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Pool one complete window per row: ``kv`` / ``gate`` ``[k, m, C]`` (gate without ``ape``),
    ``prev`` the rows' Ca halves of the window before (overlap only; ``None`` for the first window),
    ``entry`` the index of each row's new entry. Returns ``[k, dim]`` entries and the rows' Ca halves
    (``[k, m, dim]`` each, overlap only). Same math as ``Compressor.pool`` with one window per row."""
    m, d = comp.ratio, comp.dim
    gate = gate + comp.ape
    last = None
    if comp.overlap:
        zero_kv = kv.new_zeros(m, d)
        inf_gate = gate.new_full((m, d), float("-inf"))
        prev_kv = torch.stack([zero_kv if p is None else p[0].to(kv.dtype) for p in prev])
        prev_gate = torch.stack([inf_gate if p is None else p[1].to(gate.dtype) for p in prev])
        slots_kv = torch.cat([prev_kv, kv[:, :, d:]], dim=1)
        slots_gate = torch.cat([prev_gate, gate[:, :, d:]], dim=1)
        last = (kv[:, :, :d], gate[:, :, :d])
    else:
        slots_kv, slots_gate = kv, gate
    weights = slots_gate.softmax(dim=1, dtype=torch.float32).to(slots_kv.dtype)
    pooled = comp.norm((slots_kv * weights).sum(dim=1))
    positions = torch.tensor(entry, device=kv.device) * m
    cos, sin = comp.rope.cos_sin(positions, pooled.dtype)
    return apply_rope(pooled, cos, sin), last


def compressor_decode(comp: Compressor, x: torch.Tensor, states: Sequence[CompressorState]
                      ) -> tuple[list[torch.Tensor | None], list[CompressorState]]:
    """One token per row (``x``: ``[B, hidden]``) into each row's compressor. Returns per row the new
    entry (``[1, dim]``) or ``None``, and the new states."""
    m = comp.ratio
    B = x.shape[0]
    new_kv, new_gate = comp.wkv(x)[:, None], comp.wgate(x)[:, None]              # [B, 1, C]
    lens = [st.num_pending for st in states]
    P = max(lens)
    if P:
        kv = torch.cat([_pad([st.pending_kv for st in states], left=True), new_kv], dim=1)   # [B, P + 1, C]
        gate = torch.cat([_pad([st.pending_gate for st in states], left=True), new_gate], dim=1)
    else:
        kv, gate = new_kv, new_gate
    closing = [b for b in range(B) if lens[b] + 1 == m]
    entries: list[torch.Tensor | None] = [None] * B
    out: list[CompressorState | None] = [None] * B
    if closing:
        idx = torch.tensor(closing, device=x.device)
        prev = [None if states[b].prev_kv is None else (states[b].prev_kv, states[b].prev_gate) for b in closing]
        pooled, last = _close_windows(comp, kv[idx, -m:], gate[idx, -m:], prev,
                                      [states[b].num_entries for b in closing])
        empty = kv.new_zeros(0, kv.shape[-1])
        for j, b in enumerate(closing):
            entries[b] = pooled[j:j + 1]
            pk, pg = (last[0][j], last[1][j]) if last is not None else (None, None)
            out[b] = CompressorState(empty, empty, pk, pg, states[b].num_entries + 1)
    kv_rows, gate_rows = kv.unbind(0), gate.unbind(0)
    for b, st in enumerate(states):
        if out[b] is None:
            a = P - lens[b]
            out[b] = CompressorState(kv_rows[b][a:], gate_rows[b][a:], st.prev_kv, st.prev_gate, st.num_entries)
    return entries, out


def _append(old: Sequence[torch.Tensor], new: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per row ``old`` with ``new`` appended; an unchanged row keeps its tensor (states are immutable)."""
    return [o if n is None else torch.cat([o, n]) for o, n in zip(old, new)]


def _stored(attn, store, new: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The rows' new entries in their stored form (MODEL1 rows with kv_fp8, quantised in one call;
    as computed otherwise)."""
    rows = [b for b, n in enumerate(new) if n is not None]
    if not attn.kv_fp8 or not rows:
        return list(new)
    packed = store(torch.cat([new[b] for b in rows]))
    out: list[torch.Tensor | None] = [None] * len(new)
    for j, b in enumerate(rows):
        out[b] = packed[j:j + 1]
    return out


# ---------------------------------------------------------------------------------------- attention
def attention_decode(attn, x: torch.Tensor, states: Sequence[LayerState]
                     ) -> tuple[torch.Tensor, list[LayerState]]:
    """``Attention.forward_step`` for one token per row: ``x`` ``[B, hidden]`` (row ``b`` at position
    ``states[b].num_tokens``) -> ``[B, hidden]`` and the rows' new layer states."""
    B, dev = x.shape[0], x.device
    W = attn.window
    p0 = [st.num_tokens for st in states]
    positions = torch.tensor(p0, device=dev)
    q_lora, q, kv, cos, sin = attn._project(x, positions)

    # window rings, left-padded, new row appended; row b keeps / reads its last min(len_b + 1, W)
    wlens = [st.window.shape[0] for st in states]
    L = max(wlens)
    if L:
        raw = torch.cat([_pad([st.window for st in states], left=True), kv[:, None]], dim=1)   # [B, L + 1, D]
    else:
        raw = kv[:, None]
    keep = [min(n + 1, W) for n in wlens]
    K = min(L + 1, W)
    keys = raw[:, L + 1 - K:]                                                     # [B, K, D]
    valid = None               # [B, K] length mask, None when every row reads all K columns
    if any(k != K for k in keep):
        valid = torch.arange(K, device=dev)[None, :] >= (K - torch.tensor(keep, device=dev))[:, None]

    comp = keys_list = cstates = istates = None
    if attn.compressor is not None:
        new, cstates = compressor_decode(attn.compressor, x, [st.compressor for st in states])
        comp = _append([st.compressed for st in states], _stored(attn, attn.store_entries, new))
    if attn.indexer is not None:
        new, istates = compressor_decode(attn.indexer.compressor, x, [st.indexer for st in states])
        keys_list = _append([st.index_keys for st in states], _stored(attn, attn.store_keys, new))

    if comp is not None:
        counts = [c.shape[0] for c in comp]
        T = max(counts)
        if T:
            entries = attn.read_entries(_pad(comp, left=False), x.dtype)        # [B, T, D]
            ragged = any(c != T for c in counts)
            if ragged:
                have = torch.tensor(counts, device=dev)[:, None]
                present = torch.arange(T, device=dev)[None, :] < have            # [B, T]
            if attn.indexer is not None:     # every complete entry is visible to a decode token
                scores = index_scores(attn.indexer, x, q_lora, positions,
                                      attn.read_keys(_pad(keys_list, left=False), x.dtype))
                if ragged:
                    scores = scores.masked_fill(~present, float("-inf"))
                k = min(attn.indexer.topk, T)
                if k < T:
                    top = scores.topk(k, dim=-1).indices                         # [B, k]
                    entries = entries.gather(1, top[..., None].expand(-1, -1, entries.shape[-1]))
                    if ragged:
                        present = top < have
            keys = torch.cat([keys, entries], dim=1)
            if ragged or valid is not None:
                if valid is None:
                    valid = torch.ones(B, K, dtype=torch.bool, device=dev)
                if not ragged:
                    present = torch.ones(B, T, dtype=torch.bool, device=dev)
                valid = torch.cat([valid, present], dim=1)

    logits = torch.matmul(q, keys.transpose(1, 2)) * attn.scale                  # [B, H, K]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink = attn.attn_sink.to(logits.dtype).view(1, -1, 1).expand(B, -1, 1)
    logits = torch.cat([logits, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = logits.softmax(dim=-1)[..., :-1].to(keys.dtype)
    out = attn._output(torch.matmul(probs, keys), cos, sin)                      # [B, hidden]

    rows = raw.unbind(0)
    new_states = []
    for b, st in enumerate(states):
        new_states.append(LayerState(
            p0[b] + 1, rows[b][L + 1 - keep[b]:],
            None if comp is None else comp[b], None if cstates is None else cstates[b],
            None if keys_list is None else keys_list[b], None if istates is None else istates[b]))
    return out, new_states


def index_scores(indexer, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:
    """``Indexer.scores`` for one query per row over that row's keys: ``keys`` ``[B, T, Di]`` ->
    fp32 ``[B, T]``."""
    q = indexer.wq_b(q_lora).view(x.shape[0], indexer.n_heads, indexer.head_dim)
    cos, sin = indexer.rope.cos_sin(positions, q.dtype)
    q = apply_rope(q, cos, sin)
    s = torch.relu(torch.matmul(q.float(), keys.float().transpose(1, 2))) * indexer.head_dim ** -0.5   # [B, H, T]
    w = indexer.weights_proj(x).float() * indexer.n_heads ** -0.5                                     # [B, H]
    return (s * w.unsqueeze(-1)).sum(dim=1)


# ---------------------------------------------------------------------------------------- model
def decode_batch(model, token_ids: torch.Tensor, states: Sequence[SequenceState]
                 ) -> tuple[torch.Tensor, list[SequenceState]]:
    """Logits ``[B, vocab]`` of token ``token_ids[b]`` following ``states[b]`` for every row, and the
    rows' new states (the given states are left untouched)."""
    ids = torch.as_tensor(token_ids, device=model.device).long().reshape(-1)
    if ids.numel() == 0 or ids.numel() != len(states):
        raise ValueError(f"decode_batch: {ids.numel()} tokens for {len(states)} states; pass one token per state, "
                         "at least one")
    h = model.embed(ids).unsqueeze(1).expand(-1, model.config.hc_mult, -1).contiguous()
    per_row: list[list[LayerState]] = [[] for _ in states]
    for i, block in enumerate(model.layers):
        x, post, comb = block.hc_attn(h)
        out, layer_states = attention_decode(block.attn, block.attn_norm(x), [st.layers[i] for st in states])
        h = HyperConnection.merge(out, post, comb, h)
        x, post, comb = block.hc_ffn(h)
        out = block.ffn(block.ffn_norm(x), ids)
        h = HyperConnection.merge(out, post, comb, h)
        for row, ls in zip(per_row, layer_states):
            row.append(ls)
    logits = model.head(model.norm(model.hc_head(h)))
    return logits, [SequenceState(st.num_tokens + 1, tuple(row)) for st, row in zip(states, per_row)]
