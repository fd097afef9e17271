"""The whole engine with the Triton decode backend gives the same greedy tokens as the reference.

On the CPU this runs the kernels under TRITON_INTERPRET=1 (set in conftest.py)."""
import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams

pytest.importorskip("triton")


@pytest.mark.parametrize("budget", [2048, 13])     # 13: continued prefill chunks mixed with decodes
def test_triton_backend_engine_matches_reference(tmp_path, budget):
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0, 5, 9, 200, 31], [0] + list(range(40, 75))]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for be in ("torch_ref", "triton"):
        llm = LLM(str(path), dtype="float32", device=dev, max_model_len=128, attention_backend=be, num_kv_pages=64,
                  page_size=8, max_num_batched_tokens=budget)
        outs[be] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]


def test_triton_sparse_decode_engine_matches_reference(tmp_path):
    """Sparse decode through the Triton kernel over selected pages == the masked torch reference."""
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(110)]]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for be in ("torch_ref", "triton"):
        llm = LLM(str(path), dtype="float32", device=dev, max_model_len=160, attention_backend=be, num_kv_pages=64,
                  page_size=8, sparse_attention="pages", sparse_topk_tokens=88)
        outs[be] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "engram", "llama-sparse", "llama-sparse-fp8"])
def test_fused_ops_engine_matches_plain_path(tmp_path, family):
    """Triton add+RMSNorm / rotary+KV write / SiLU*mul (and the decode GEMV) give the plain path's greedy
    tokens and logprobs (Engram layers: their term joins the stream before the fused norm; sparse "pages":
    decode steps fold their keys into the page summaries inside the rotary+KV write kernel)."""
    extra = {}
    if family.startswith("llama-sparse"):
        if not torch.cuda.is_available():     # the kernel's summary fold is checked on the CPU in test_fused_ops
            pytest.skip("engine-level check of the fused summary fold: GPU only (45 s under the interpreter)")
        extra = dict(sparse_attention="pages", sparse_topk_tokens=88)
        if family.endswith("fp8"):
            extra |= dict(kv_dtype="fp8", kv_fp8_keep_sink=8, kv_fp8_keep_recent=16)
        family = "llama"
    if family == "engram":
        from tests.helpers.tiny_engram import make_engram_checkpoint
        path = make_engram_checkpoint(tmp_path / "m")
    else:
        path = make_checkpoint(tmp_path / "m", family)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0, 5, 9, 200, 31], [0] + list(range(40, 75))]
    if extra:           # past the top-k budget: the selection reads the summaries
        prompts.append([0] + [(7 * i + 3) % 500 + 3 for i in range(110)])
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    llm = LLM(str(path), dtype="float32", device=dev, max_model_len=128, attention_backend="triton", num_kv_pages=64,
              page_size=8, fused_ops=False, enable_prefix_caching=False, **extra)
    model = llm.engine.runner.model
    assert not model.fused
    plain = llm.generate(prompts, sp)
    model.enable_fused()
    llm.engine.runner.recapture_graphs()   # (on CUDA the graphs captured at start-up would replay the old kernels)
    got = llm.generate(prompts, sp)
    model.enable_fused(gemv=True)          # decode rows through the skinny GEMM with fused norm / residual
    assert model.gemv
    llm.engine.runner.recapture_graphs()
    got_gemv = llm.generate(prompts, sp)
    for a, b, c in zip(got, plain, got_gemv):
        assert c.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in lb.items():
                assert abs(la[tok] - lp) < 1e-4


def test_triton_decode_reads_spilled_pages_from_cpu_ram(tmp_path):
    """A live sequence larger than the device pool: decode steps read the spilled pages straight from
    the CPU-RAM store inside the kernel (no gather) and give the reference's tokens."""
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(70)], [0] + [(5 * i + 1) % 400 + 3 for i in range(50)]]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs, llms = {}, {}
    for be in ("torch_ref", "triton"):
        llms[be] = LLM(str(path), dtype="float32", device=dev, max_model_len=128, attention_backend=be,
                       num_kv_pages=6, cpu_kv_gb=0.01, max_num_batched_tokens=16, enable_prefix_caching=False)
        outs[be] = [o.outputs[0].token_ids for o in llms[be].generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]
    assert llms["triton"].engine.kv.num_spilled > 0
    assert llms["triton"].engine.runner.backend.host_reads is True     # the host path ran and was checked


def test_triton_sparse_decode_over_spilled_pages(tmp_path):
    """Sparse decode with most pages in CPU RAM: pages are scored from summaries kept on the device and
    only the chosen ones are read (device or host) by the kernel -- same tokens as the reference."""
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(110)], [0] + [(5 * i + 1) % 400 + 3 for i in range(100)]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs, llms = {}, {}
    for be in ("torch_ref", "triton"):
        llms[be] = LLM(str(path), dtype="float32", device=dev, max_model_len=160, attention_backend=be,
                       page_size=8, num_kv_pages=24, cpu_kv_gb=0.01, max_num_batched_tokens=16,
                       enable_prefix_caching=False, sparse_attention="pages", sparse_topk_tokens=88)
        outs[be] = [o.outputs[0].token_ids for o in llms[be].generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]
    eng = llms["triton"].engine
    assert eng.kv.num_spilled > 0 and eng.runner.host_summaries is not None
    assert eng.runner.backend.host_reads is True


def test_triton_prefill_chunks_read_spilled_pages(tmp_path, monkeypatch):
    """A prompt larger than the device pool, prefilled in small chunks: later chunks attend to context
    already spilled to CPU RAM through the paged prefill kernel's host reads -- reference tokens."""
    import tierserve.attention.triton_backend as tb

    calls = []

    def spy(*a, **kw):
        calls.append(kw.get("host_cache") is not None)
        return real(*a, **kw)

    real = tb.paged_prefill
    monkeypatch.setattr(tb, "paged_prefill", spy)
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(90)]]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for be in ("torch_ref", "triton"):
        llm = LLM(str(path), dtype="float32", device=dev, max_model_len=128, attention_backend=be, page_size=8,
                  num_kv_pages=5, cpu_kv_gb=0.01, max_num_batched_tokens=16, enable_prefix_caching=False)
        outs[be] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]
    assert any(calls), "no prefill chunk read host pages"
    assert llm.engine.runner.backend.host_reads is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("placement", [None, "cpu"])
def test_engram_decode_in_cuda_graphs_matches_eager(tmp_path, placement):
    """Engram models decode through CUDA graphs (rows gathered before each replay into static buffers):
    same greedy tokens and logprobs as the eager path, for device and host tables."""
    from tests.helpers.tiny_engram import make_engram_checkpoint

    path = make_engram_checkpoint(tmp_path / "e")
    prompts = [[0, 5, 9, 200, 31], [0] + list(range(40, 75))]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=128, num_kv_pages=64, page_size=8,
                  enforce_eager=eager, engram_placement=placement)
        assert (llm.engine.runner.graphs is None) == eager
        outs[eager] = llm.generate(prompts, sp)
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[t] - lb[t]) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llama", "engram"])
def test_bf16_decode_bit_identical_eager_graphs_multi_step(tmp_path, family):
    """bf16 greedy decode: eager steps, CUDA-graph steps and 4-step graph windows give bit-identical logprobs
    (the split-K factor is the graphs' choice on every path; prompts > 256 tokens so that it is > 1)."""
    from tests.helpers.tiny_engram import make_engram_checkpoint

    path = make_engram_checkpoint(tmp_path / "m") if family == "engram" else make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(300)], [0] + [(5 * i + 1) % 400 + 3 for i in range(280)]]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = {}
    for eager, k in ((True, 1), (False, 1), (False, 4)):
        llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=2048, page_size=16, num_kv_pages=300,
                  enforce_eager=eager, num_scheduler_steps=k, enable_prefix_caching=False)
        assert (llm.engine.runner.graphs is None) == eager
        outs[(eager, k)] = [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs,
                                                                            o.outputs[0].token_ids)])
                            for o in llm.generate(prompts, sp)]
    assert outs[(False, 1)] == outs[(True, 1)]
    assert outs[(False, 4)] == outs[(True, 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fp8", [None, "compact"])
def test_sparse_decode_in_cuda_graphs_matches_eager(tmp_path, fp8):
    """"pages" sparse decode inside CUDA graphs (selection from the page summaries on the device; FP8 compact
    slots: from their rows) and in multi-step windows: same greedy tokens as the eager path, one step at a time."""
    path = make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(110)], [0] + [(5 * i + 1) % 400 + 3 for i in range(100)]]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kv = dict(kv_dtype="fp8", kv_fp8_storage="compact", kv_fp8_keep_sink=8, kv_fp8_keep_recent=16, max_num_seqs=2,
              max_num_batched_tokens=32) if fp8 else {}         # (small chunks: room for compact slots)
    outs = {}
    for eager, k in ((True, 1), (False, 1), (False, 8)):
        llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=160, page_size=8, num_kv_pages=64,
                  sparse_attention="pages", sparse_topk_tokens=88, enforce_eager=eager, num_scheduler_steps=k, **kv)
        if fp8:
            assert llm.engine.runner.num_compact_pages > 0
        assert (llm.engine.runner.graphs is None) == eager
        outs[(eager, k)] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs[(False, 1)] == outs[(True, 1)]
    assert outs[(False, 8)] == outs[(True, 1)]


def _record_replays(monkeypatch) -> list[bool]:
    """Every decode-graph replay from now on appends whether it was of the set captured with spill stores."""
    from tierserve.runner.cuda_graphs import DecodeGraphs

    replays, real = [], DecodeGraphs.replay
    monkeypatch.setattr(DecodeGraphs, "replay",
                        lambda self, bs, spill=False: replays.append(spill) or real(self, bs, spill))
    return replays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sparse,kv", [(None, "auto"), ("pages", "auto"), (None, "fp8"), ("pages", "fp8")])
def test_decode_over_spilled_pages_in_cuda_graphs_matches_eager(tmp_path, monkeypatch, sparse, kv):
    """Tiers: decode steps whose spilled pages are in CPU RAM replay CUDA graphs captured with the spill
    stores (pages read in place -- FP8: compact rows --, selections counted in the graph): same tokens as
    eager steps."""
    replays = _record_replays(monkeypatch)
    path = make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(110)], [0] + [(5 * i + 1) % 400 + 3 for i in range(100)]]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=160, page_size=8, num_kv_pages=10,
                  cpu_kv_gb=0.01, enforce_eager=eager, enable_prefix_caching=False, sparse_attention=sparse,
                  sparse_topk_tokens=88, kv_dtype=kv, kv_fp8_keep_sink=8, kv_fp8_keep_recent=16)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert llm.engine.kv.num_spilled > 0
    assert True in replays, "no decode step replayed a graph captured with the spill stores"
    assert outs[False] == outs[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sparse,kv", [("pages", "auto"), ("pages", "fp8"), (None, "auto")])
def test_tiered_multi_step_windows_replay_the_spill_graphs(tmp_path, monkeypatch, sparse, kv):
    """TIERSERVE_TIERED_MULTI_STEP: multi-step windows over spilled pages replay the spill graphs back to back;
    the same tokens as eager single steps."""
    from tierserve.runner import multi_step

    replays = _record_replays(monkeypatch)
    path = make_checkpoint(tmp_path / "m", "llama")
    prompt = [0] + [(7 * i + 3) % 500 + 3 for i in range(110)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(dtype="float32", device="cuda", max_model_len=160, page_size=8, num_kv_pages=10, cpu_kv_gb=0.01,
              enable_prefix_caching=False, sparse_attention=sparse, sparse_topk_tokens=88, kv_dtype=kv,
              kv_fp8_keep_sink=8, kv_fp8_keep_recent=16)
    want = LLM(str(path), enforce_eager=True, num_scheduler_steps=1, **kw).generate([prompt], sp)[0].outputs[0]
    monkeypatch.setattr(multi_step, "TIERED", True)
    llm = LLM(str(path), num_scheduler_steps=8, **kw)
    launched, real = [], llm.engine.runner.launch_multi
    llm.engine.runner.launch_multi = lambda *a, **k: launched.append(1) or real(*a, **k)
    replays.clear()
    got = llm.generate([prompt], sp)[0].outputs[0]
    assert llm.engine.kv.num_spilled > 0 and launched and True in replays
    assert got.token_ids == want.token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cpu_tier_steps_without_spilled_pages_replay_the_plain_graphs(tmp_path, monkeypatch):
    """With a CPU-RAM tier but no page spilled, decode replays the graphs without the host-page path (the
    spill graphs served every step and cost 20% at 128k on the H200); tokens as without the tier."""
    replays = _record_replays(monkeypatch)
    path = make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(40)], [0] + [(5 * i + 1) % 400 + 3 for i in range(30)]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for tier in ({}, {"cpu_kv_gb": 0.01}):
        llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=160, page_size=8, num_kv_pages=64,
                  enable_prefix_caching=False, **tier)
        outs[bool(tier)] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert llm.engine.kv.num_spilled == 0
    assert replays and not any(replays)
    assert outs[True] == outs[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash prefill path is CUDA-only")
@pytest.mark.parametrize("graphs", [False, True])
def test_tiered_run_is_bit_identical_to_all_gpu_in_bf16(tmp_path, graphs):
    """Lossless tiers on the GPU path: bf16, chunked prefill over a partly spilled context (staged host pages go
    through the same flash calls as device pages) and decode reading spilled pages -- the all-GPU run's greedy
    tokens and logprobs bit for bit (on the H200 the tiered shares of `bench tiers` drifted: the staged paged
    prefill kernel summed in another order than the flash path)."""
    path = make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(110)], [0] + [(5 * i + 1) % 400 + 3 for i in range(100)]]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = {}
    for tiered in (False, True):
        pool = dict(num_kv_pages=10, cpu_kv_gb=0.01) if tiered else dict(num_kv_pages=64)
        llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=160, page_size=8, enforce_eager=not graphs,
                  enable_prefix_caching=False, max_num_batched_tokens=32, **pool)
        res = llm.generate(prompts, sp)
        outs[tiered] = [(o.outputs[0].token_ids, [next(iter(d.values())) for d in o.outputs[0].logprobs]) for o in res]
        if tiered:
            assert llm.engine.kv.num_spilled > 0
    assert outs[True] == outs[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dense FP8 prefill fallback is CUDA-only")
def test_sparse_fp8_prefill_chunks_are_sparse_on_cuda(tmp_path, caplog):
    """Sparse attention over FP8 pages on the GPU: prefill chunks past the budget read their blocks' top-k pages
    (attention/sparse_fp8_prefill.py, no "attend densely" warning), with the torch reference's tokens."""
    path = make_checkpoint(tmp_path / "m", "llama")
    prompts = [[0] + [(7 * i + 3) % 500 + 3 for i in range(150)]]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = {}
    for backend in ("torch_ref", "triton"):
        llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=192, page_size=8, num_kv_pages=64,
                  kv_dtype="fp8", sparse_attention="pages", sparse_topk_tokens=88, max_num_batched_tokens=32,
                  enable_prefix_caching=False, attention_backend=backend, kv_fp8_storage="inplace")
        with caplog.at_level("WARNING", logger="tierserve"):
            outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs["triton"] == outs["torch_ref"]
    assert "prefill chunks attend densely" not in caplog.text
