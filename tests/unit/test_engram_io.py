"""Engram weights: safetensors save/load round trip in the model.layers.N.engram.* layout."""
import pytest
import torch
from safetensors import safe_open

from tierserve.memory import Engram, EngramConfig, table_sizes
from tierserve.memory.engram_io import (
    CANONICAL_KEY,
    load_engram,
    load_engram_weights,
    read_engram_config,
    save_engram,
    split_engram_key,
)

C = 16


def _modules(cfg, seed=0, **kw):
    mods = {}
    for layer in cfg.layers:
        m = Engram(cfg, layer, C, **kw)
        m.reset_parameters(torch.Generator().manual_seed(seed + layer))
        mods[layer] = m
    return mods


def _cfg(**kw):
    return EngramConfig(**{"layers": (1, 3), "heads_per_order": 2, "dim_per_head": 32, "table_size": 53,
                           "conv_kernel_size": 3, "hc_mult": 2, **kw})


def _outputs(mods, seed=1):
    g = torch.Generator().manual_seed(seed)
    res = {}
    for layer, m in mods.items():
        rows = torch.randint(0, m.table.num_rows, (5, m.cfg.num_heads), generator=g)
        hidden = torch.randn(5, m.cfg.hc_mult, C, generator=g)
        res[layer] = m(hidden, m.table.gather(rows))[0]
    return res


def test_key_layout():
    cfg = _cfg(fp8_rows=True)
    m = _modules(cfg)[1]
    shapes = {n: tuple(t.shape) for n, t in m.checkpoint_tensors().items()}
    R, E = sum(table_sizes(cfg)[1]), 2 * 2 * 32
    assert shapes == {"table.weight": (R, 32), "table.weight_scale": (R, 1), "key_proj.weight": (2 * C, E),
                      "value_proj.weight": (C, E), "key_norm.weight": (2, C), "query_norm.weight": (2, C),
                      "conv_norm.weight": (2, C), "conv.weight": (2 * C, 3)}
    assert m.checkpoint_tensors()["table.weight"].dtype == torch.float8_e4m3fn
    assert split_engram_key("model.layers.12.engram.table.weight") == (12, "table.weight")
    assert split_engram_key("model.layers.12.mlp.up_proj.weight") is None


@pytest.mark.parametrize("fp8", [False, True])
def test_save_load_round_trip(tmp_path, fp8):
    cfg = _cfg(fp8_rows=fp8)
    src = _modules(cfg)
    canonical = torch.arange(40) % 31
    path = tmp_path / "engram.safetensors"
    save_engram(path, src, canonical)
    assert read_engram_config(path) == cfg
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.3.engram.value_proj.weight" in keys and CANONICAL_KEY in keys
    want = _outputs(src)
    for placement in ("device", "cpu", "disk"):
        dst = _modules(_cfg(fp8_rows=fp8, placement=placement), seed=100)     # different init
        got_canonical = load_engram(path, dst)
        assert torch.equal(got_canonical, canonical)
        got = _outputs(dst)
        for layer in cfg.layers:
            assert torch.equal(got[layer], want[layer]), placement
        for layer, m in dst.items():
            for n, t in m.checkpoint_tensors().items():
                assert torch.equal(t.view(torch.uint8), src[layer].checkpoint_tensors()[n].view(torch.uint8))
    # a float checkpoint loads into an FP8 table (quantised on load) and stays close
    if not fp8:
        q = _modules(_cfg(fp8_rows=True, placement="cpu"), seed=100)
        load_engram(path, q)
        for layer in cfg.layers:
            torch.testing.assert_close(_outputs(q)[layer], want[layer], rtol=0.1, atol=0.1)


def test_load_errors(tmp_path):
    cfg = _cfg()
    src = _modules(cfg)
    path = tmp_path / "e.safetensors"
    save_engram(path, {1: src[1]})
    with pytest.raises(ValueError, match="layer 3 is missing"):
        load_engram(path, _modules(cfg))
    with pytest.raises(ValueError, match="layer 5 has no Engram"):
        load_engram_weights(src, [("model.layers.5.engram.key_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape mismatch"):
        load_engram_weights(src, [("model.layers.1.engram.key_proj.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="row format differs"):
        load_engram(path, {1: Engram(_cfg(placement="disk", fp8_rows=True), 1, C)})
    used = load_engram_weights(src, [("model.layers.1.engram.conv.weight", torch.zeros(2 * C, 3)),
                                     ("model.norm.weight", torch.zeros(C))])
    assert used == {"model.layers.1.engram.conv.weight"}


def test_sharded_checkpoint_maps_disk_tables(tmp_path):
    cfg = _cfg()
    src = _modules(cfg)
    save_engram(tmp_path / "a.safetensors", {1: src[1]})
    save_engram(tmp_path / "b.safetensors", {3: src[3]})
    dst = _modules(_cfg(placement="disk"), seed=50)
    for shard in ("a", "b"):
        load_engram(tmp_path / f"{shard}.safetensors", dst, strict=False)
    want, got = _outputs(src), _outputs(dst)
    for layer in cfg.layers:
        assert torch.equal(got[layer], want[layer])
    assert not list(tmp_path.glob("layer*"))          # mapped from the checkpoint, no table files written
