"""The FP8 sparse decode launch settings (attention/fp8_decode_config.py): parsing and clear errors."""
import pytest

from tierserve.attention import fp8_decode_config as cfg


def test_parse_settings():
    assert cfg.parse("") == {}
    assert cfg.parse("num_splits=16, block_n=32,num_warps=4,num_stages=1,fast=1") == \
        dict(num_splits=16, block_n=32, num_warps=4, num_stages=1, fast=True)
    assert cfg.parse("fast=0") == {"fast": False}
    assert cfg.parse("fast=1,block_n=16") == {"fast": True, "block_n": 16}
    assert cfg.parse("bulk=1,fast=1") == {"bulk": True, "fast": True}
    assert cfg.parse("lean=1,num_stages=5") == {"lean": True, "num_stages": 5}


@pytest.mark.parametrize("bad", ["splits=4", "block_n", "num_warps=four", "num_stages=0", "prefetch=1", "fast=3", "bulk=2"])
def test_bad_settings_say_what_is_wrong(bad):
    with pytest.raises(ValueError, match="X:"):
        cfg.parse(bad, "X")


def test_dense_sparse_and_host_settings_are_separate(monkeypatch):
    monkeypatch.setattr(cfg, "SPARSE", {"block_n": 32})
    monkeypatch.setattr(cfg, "SPARSE_HOST", {"num_warps": 8})
    monkeypatch.setattr(cfg, "DENSE", {"num_stages": 1})
    assert cfg.decode_config(True, False) == {**cfg.DEFAULT_SPARSE, "block_n": 32}
    assert cfg.decode_config(True, True) == {**cfg.DEFAULT_SPARSE_HOST, "num_warps": 8}
    assert cfg.decode_config(False, False) == cfg.decode_config(False, True) == {**cfg.DEFAULT_DENSE, "num_stages": 1}
    assert cfg.decode_config(True, False, page_size=64)["block_n"] == 64          # a block holds a whole page
    cfg.decode_config(True, False)["num_splits"] = 3          # a copy: the caller may add to it
    cfg.decode_config(False, False)["num_splits"] = 3
    assert cfg.SPARSE == {"block_n": 32} and cfg.DENSE == {"num_stages": 1} and "num_splits" not in cfg.DEFAULT_SPARSE
    assert "num_splits" not in cfg.DEFAULT_DENSE
