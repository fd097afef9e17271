"""--load-format dummy with Engram: the backbone's random weights and the tables' rows do not depend on where
the tables live (bench engram compares placements on these weights), on the CPU and, when present, a GPU."""
import json

import pytest
import torch

from tierserve import LLM
from tierserve.loader.hf import load_config, resolve_model_path
from tierserve.memory.engram_table import EngramTable

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _state(llm) -> dict[str, torch.Tensor]:
    model = llm.engine.runner.model
    out = {n: p.detach().cpu() for n, p in model.named_parameters() if ".engram.table." not in n}
    for i, layer in enumerate(model.layers):
        if layer.engram is not None:
            out[f"table{i}"] = layer.engram.table.storage()["weight"].detach().cpu()
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_dummy_weights_do_not_depend_on_placement(tmp_path, device):
    cfg = load_config(resolve_model_path(None))
    cfg["engram"] = {"layers": [1, 2], "heads_per_order": 2, "dim_per_head": 32, "table_size": 300}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    states = []
    for placement in ("device", "cpu"):
        llm = LLM(str(tmp_path), load_format="dummy", device=device, max_model_len=64, max_num_seqs=2,
                  engram_placement=placement, enforce_eager=True)
        states.append(_state(llm))
    assert states[0].keys() == states[1].keys() and "table1" in states[0]
    for name, t in states[0].items():
        assert torch.equal(t, states[1][name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_reset_parameters_same_rows_for_every_placement(device):
    tables = [EngramTable(1000, 32, placement=p, device=device, dtype=torch.bfloat16) for p in ("device", "cpu")]
    for t in tables:
        t.reset_parameters(0.5, torch.Generator().manual_seed(7))
    a, b = (t.storage()["weight"].cpu() for t in tables)
    assert torch.equal(a, b) and a.float().std().item() == pytest.approx(0.5, rel=0.1)
