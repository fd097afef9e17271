"""Engram module: gate formula, chunked == one call (conv history carried), packed batch == separate,
host placement == device placement bit for bit, through the runner-facing prepare_engram_step API."""
import math

import pytest
import torch

from tierserve.memory import (
    Engram,
    EngramConfig,
    NgramHasher,
    engram_history,
    engram_modules,
    prepare_engram_step,
)

C, VOCAB = 32, 120
TOL = {"rtol": 1e-10, "atol": 1e-12}    # float64: only summation order may differ between chunkings
F64 = {"dtype": torch.float64}


def _cfg(**kw) -> EngramConfig:
    return EngramConfig(**{"layers": (0, 2), "heads_per_order": 2, "dim_per_head": 32, "table_size": 101,
                           "conv_kernel_size": 4, **kw})


def _module(cfg, layer=0, seed=0, **kw) -> Engram:
    g = torch.Generator().manual_seed(seed)
    m = Engram(cfg, layer, C, eps=1e-6, **kw)
    m.reset_parameters(g)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.startswith("conv."):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g) if "norm" in name
                        else torch.randn(p.shape, generator=g) * 0.5)
    return m


def _hasher(cfg) -> NgramHasher:
    return NgramHasher(cfg, torch.arange(VOCAB) % 97)


def test_gate_and_value_formula_without_conv():
    cfg = _cfg(conv_kernel_size=0)
    m = _module(cfg, **F64)
    T = 6
    hidden, emb = torch.randn(T, C, **F64), torch.randn(T, cfg.engram_dim, **F64)
    out, state = m(hidden, emb)
    assert state is None and out.shape == (T, C)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    k = rms(emb @ m.key_proj.weight.T, m.key_norm.weight[0])
    q = rms(hidden, m.query_norm.weight[0])
    s = (k * q).sum(-1) / math.sqrt(C)
    gate = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs()))
    torch.testing.assert_close(out, gate[:, None] * (emb @ m.value_proj.weight.T), **TOL)


@pytest.mark.parametrize("hc", [1, 2])
def test_chunks_with_carried_conv_state_equal_one_call(hc):
    torch.manual_seed(hc)
    cfg = _cfg(hc_mult=hc)
    m = _module(cfg, **F64)
    T = 23
    hidden = torch.randn(T, hc, C, **F64) if hc > 1 else torch.randn(T, C, **F64)
    emb = torch.randn(T, cfg.engram_dim, **F64)
    full, full_state = m(hidden, emb)
    assert full_state.shape == (1, 9, hc * C)            # (K-1) * dilation(3) positions
    for cuts in ([1, 2, 5, 6, 23], [12, 23], list(range(1, 24))):
        start, outs, state = 0, [], None
        for end in cuts:
            qsl = torch.tensor([0, end - start])
            o, state = m(hidden[start:end], emb[start:end], qsl, state)
            outs.append(o)
            start = end
        torch.testing.assert_close(torch.cat(outs), full, **TOL)
        torch.testing.assert_close(state, full_state, **TOL)
    # a preempted request restarts with a zero state and recomputes: same outputs
    again, _ = m(hidden[:10], emb[:10])
    torch.testing.assert_close(again, full[:10], **TOL)
    # the conv matters: without the carried state the second chunk differs
    o_nostate, _ = m(hidden[12:], emb[12:])
    assert not torch.allclose(o_nostate, full[12:])


def test_packed_batch_equals_separate_sequences():
    torch.manual_seed(0)
    cfg = _cfg()
    m = _module(cfg, **F64)
    lens = [5, 1, 9, 3]
    hs = [torch.randn(n, C, **F64) for n in lens]
    es = [torch.randn(n, cfg.engram_dim, **F64) for n in lens]
    states = torch.randn(4, 9, C, **F64)
    qsl = torch.tensor([0, 5, 6, 15, 18])
    packed, new = m(torch.cat(hs), torch.cat(es), qsl, states)
    for b in range(4):
        o, st = m(hs[b], es[b], torch.tensor([0, lens[b]]), states[b:b + 1])
        torch.testing.assert_close(packed[qsl[b]:qsl[b + 1]], o, **TOL)
        torch.testing.assert_close(new[b:b + 1], st, **TOL)
    with pytest.raises(ValueError, match="conv_state"):
        m(torch.cat(hs), torch.cat(es), qsl, states[:2])


class _Toy(torch.nn.Module):
    """Stand-in for a decoder: Engram on some layers, driven by an EngramStep like the model will be."""

    def __init__(self, cfg, **kw):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for i in range(3):
            blk = torch.nn.Module()
            blk.engram = _module(cfg, i, seed=i, **kw) if i in cfg.layers else None
            self.layers.append(blk)

    def forward(self, x, step):
        for blk in self.layers:
            if blk.engram is not None:
                x = x + step.apply(blk.engram, x)
            x = torch.tanh(x)
        return x


def _run(model, hasher, reqs, hidden, schedule):
    """Run requests through chunked steps; schedule = list of steps, each [(req, start, end), ...]."""
    mods = engram_modules(model)
    W = mods[0].conv_state_shape[0]
    conv = {r: {layer: torch.zeros(W, C, **F64) for layer in mods} for r in range(len(reqs))}
    outs = {r: [] for r in range(len(reqs))}
    for step in schedule:
        ids = torch.cat([reqs[r][s:e] for r, s, e in step])
        qsl = torch.tensor([0] + [e - s for _, s, e in step]).cumsum(0)
        hist = torch.tensor([engram_history(reqs[r].tolist(), s) for r, s, _ in step])
        states = {layer: torch.stack([conv[r][layer] for r, _, _ in step]) for layer in mods}
        es = prepare_engram_step(mods, hasher, ids, qsl, hist, states)
        y = model(torch.cat([hidden[r][s:e] for r, s, e in step]), es)
        for b, (r, s, e) in enumerate(step):
            outs[r].append(y[qsl[b]:qsl[b + 1]])
            for layer in mods:
                conv[r][layer] = es.new_conv_state[layer][b]
    return {r: torch.cat(o) for r, o in outs.items()}


def test_runner_flow_chunked_prefill_and_host_placement(tmp_path):
    torch.manual_seed(0)
    reqs = [torch.randint(0, VOCAB, (n,)) for n in (14, 9)]
    hidden = [torch.randn(len(r), C, **F64) for r in reqs]
    cfg = _cfg()
    hasher = _hasher(cfg)
    dev_model = _Toy(cfg, **F64)
    whole = _run(dev_model, hasher, reqs, hidden, [[(0, 0, 14), (1, 0, 9)]])
    sep = _run(dev_model, hasher, reqs, hidden, [[(0, 0, 14)], [(1, 0, 9)]])
    chunked = _run(dev_model, hasher, reqs, hidden,
                   [[(0, 0, 4)], [(0, 4, 5), (1, 0, 6)], [(1, 6, 7), (0, 5, 13)], [(0, 13, 14), (1, 7, 9)]])
    for r in range(2):
        torch.testing.assert_close(sep[r], whole[r], **TOL)
        torch.testing.assert_close(chunked[r], whole[r], **TOL)
    # host RAM and memory-mapped placements: same weights, bit-identical outputs for the same schedule
    for placement in ("cpu", "disk"):
        host_cfg = _cfg(placement=placement, disk_path=str(tmp_path) if placement == "disk" else None)
        host_model = _Toy(host_cfg, **F64)
        host_model.load_state_dict(dev_model.state_dict(), strict=False)
        for layer, m in engram_modules(host_model).items():
            m.table.load_("weight", engram_modules(dev_model)[layer].table.weight)
        out = _run(host_model, hasher, reqs, hidden, [[(0, 0, 4)], [(0, 4, 14), (1, 0, 9)]])
        ref = _run(dev_model, hasher, reqs, hidden, [[(0, 0, 4)], [(0, 4, 14), (1, 0, 9)]])
        for r in range(2):
            assert torch.equal(out[r], ref[r]), placement
        assert "table.weight" not in dict(host_model.named_parameters())
