"""The graph decode step with every Triton kernel on (``decode_static(fused=True)``: routed experts, mHC
Sinkhorn and RMS norm, norms, rope) against ``decode_batch``, fp32: on the GPU when there is one, else on
the CPU under TRITON_INTERPRET=1 (fewer steps: the interpreter is slow). Batch 2 crossing CSA 4 / HCA 8."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tests.helpers.tiny_deepseek_v4 import make_checkpoint, one_thread, rand_ids  # noqa: F401
from tierserve.models.deepseek_v4 import load_model
from tierserve.models.deepseek_v4.static_decode import decode_static
from tierserve.models.deepseek_v4.static_state import StaticState

DEV = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 42 if DEV == "cuda" else 10


@pytest.mark.parametrize("name", ["mixed", "hca-first"])
def test_fused_step_equals_decode_batch(tmp_path, name):
    model = load_model(make_checkpoint(tmp_path, name), device=DEV)
    ref, tok = [], []
    for i, n in enumerate((6, 14)):
        logits, st = model.prefill(torch.tensor(rand_ids(n, seed=i), device=DEV))
        ref.append(st)
        tok.append(int(logits[-1].argmax()))
    ss = StaticState(model, slots=2, max_len=96)
    for b, st in enumerate(ref):
        ss.load(b, st)
    for _ in range(STEPS):
        want, ref = model.decode_batch(torch.tensor(tok, device=DEV), ref)
        got = decode_static(model, ss, torch.tensor(tok, device=DEV), fused=True)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        tok = want.argmax(-1).tolist()
        assert got.argmax(-1).tolist() == tok
