"""Checkpoint loading: sharded safetensors, and errors that name the missing file or the bad tensor."""
import json
import shutil

import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load") / "m", "llama")


def make(path, **kw):
    return LLM(str(path), dtype="float32", device="cpu", max_model_len=128, **kw)


def test_sharded_checkpoint_loads_identically(ckpt, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(ckpt / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    p = [0, 5, 9, 33, 41]
    assert make(sharded).generate([p], SP)[0].outputs[0].token_ids == make(ckpt).generate([p], SP)[0].outputs[0].token_ids


def test_missing_files_are_named(ckpt, tmp_path):
    d = tmp_path / "nocfg"
    shutil.copytree(ckpt, d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        make(d)
    d = tmp_path / "noweights"
    shutil.copytree(ckpt, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        make(d)
    d = tmp_path / "notok"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        make(d)


def test_shape_mismatch_names_the_tensor(ckpt, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] + 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'"):
        make(d)


def test_extra_tensor_is_named(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "extra"
    shutil.copytree(ckpt, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mystery"):
        make(d)
