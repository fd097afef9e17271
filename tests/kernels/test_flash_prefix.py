"""Prefill chunks over cached context as two flash calls merged by log-sum-exp (attention/flash_prefix.py)
== masked attention over context + own keys; and the engine with that path == the torch reference."""
import pytest
import torch

from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams
from tierserve.attention import flash_prefix, triton_backend


def _reference(q, k, v, ctx_k, ctx_v, scale):
    """q [n, Hq, D]; own k/v [n, Hkv, D]; context [Hkv, L, D] -> [n, Hq, D] (fp32 math, masked)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    keys = torch.cat([ctx_k, k.transpose(0, 1)], dim=1).float().repeat_interleave(hq // hkv, dim=0)
    vals = torch.cat([ctx_v, v.transpose(0, 1)], dim=1).float().repeat_interleave(hq // hkv, dim=0)
    L = ctx_k.shape[1]
    s = q.transpose(0, 1).float() @ keys.transpose(-1, -2) * scale                 # [Hq, n, L+n]
    mask = torch.arange(L + n)[None, :] <= (L + torch.arange(n))[:, None]
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    return (torch.softmax(s, -1) @ vals).transpose(0, 1)


def _case(n, L, hq, hkv, d, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
    return r(n, hq, d), r(n, hkv, d), r(n, hkv, d), r(hkv, L, d), r(hkv, L, d)


@pytest.mark.parametrize("n,L,hq,hkv", [(1, 5, 4, 4), (7, 37, 8, 2), (16, 0, 4, 1), (13, 64, 8, 8), (1100, 50, 2, 1)])
def test_chunk_attention_matches_masked_reference(n, L, hq, hkv):
    q, k, v, ck, cv = _case(n, L, hq, hkv, 32, torch.float32, "cpu", n * 100 + L)
    got = flash_prefix.chunk_attention(q, k, v, ck, cv, 0.17)
    torch.testing.assert_close(got, _reference(q, k, v, ck, cv, 0.17), atol=1e-5, rtol=1e-5)


def test_gather_context_reads_pages_in_order():
    page, hkv, d = 4, 2, 8
    kc, vc = torch.randn(10, page, hkv, d), torch.randn(10, page, hkv, d)
    pages = torch.tensor([7, 2, 5, 9])
    keys, vals = flash_prefix.gather_context(kc, vc, pages, 11)
    want = kc[pages].reshape(-1, hkv, d)[:11].transpose(0, 1)
    assert keys.shape == (hkv, 11, d) and torch.equal(keys, want)
    assert torch.equal(vals, vc[pages].reshape(-1, hkv, d)[:11].transpose(0, 1))


def test_gather_context_with_staged_host_pages_gives_the_same_values():
    """Pages spilled to CPU RAM and staged on the device (ids >= N read the staged copy): the gathered keys and
    values are bit-identical to those of the same pages all on the device (tiers stay lossless)."""
    page, hkv, d, n_dev = 4, 2, 8, 10
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(n_dev, page, hkv, d, generator=g), torch.randn(n_dev, page, hkv, d, generator=g)
    pages = torch.tensor([7, 2, 5, 9, 1])
    dev_k, dev_v = flash_prefix.gather_context(kc, vc, pages, 18)
    # pages 2 and 9 spilled: staged at rows 1 and 0; their device pages now hold other data
    staged_k, staged_v = torch.stack([kc[9], kc[2]]), torch.stack([vc[9], vc[2]])
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[[2, 9]], vc2[[2, 9]] = torch.randn(2, page, hkv, d, generator=g), torch.randn(2, page, hkv, d, generator=g)
    mixed = torch.tensor([7, n_dev + 1, 5, n_dev + 0, 1])
    keys, vals = flash_prefix.gather_context(kc2, vc2, mixed, 18, (staged_k, staged_v))
    assert torch.equal(keys, dev_k) and torch.equal(vals, dev_v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs CUDA")
@pytest.mark.parametrize("n,L", [(1, 300), (257, 1000), (512, 0), (64, 4096)])
def test_flash_chunk_attention_on_cuda(n, L):
    q, k, v, ck, cv = _case(n, L, 32, 8, 128, torch.bfloat16, "cuda", n + L)
    assert flash_prefix.flash_ok(q)
    got = flash_prefix.chunk_attention(q, k, v, ck, cv, 128 ** -0.5)
    torch.testing.assert_close(got.float(), _reference(q, k, v, ck, cv, 128 ** -0.5), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("budget", [13, 40])
def test_engine_with_flash_prefix_matches_reference(tmp_path, monkeypatch, budget):
    """Continued chunks (budget 13) and prefix-cache hits through the LSE-merged path (plain-PyTorch parts on
    the CPU) give the reference's greedy tokens."""
    monkeypatch.setattr(triton_backend, "flash_ok", lambda q: True)
    path = make_checkpoint(tmp_path / "m", "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[0] + list(range(40, 75)), [0] + list(range(40, 70)) + [3, 4], [0, 5, 9, 200, 31]]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for be in ("torch_ref", "triton"):
        llm = LLM(str(path), dtype="float32", device=dev, max_model_len=128, attention_backend=be,
                  num_kv_pages=64, page_size=8, max_num_batched_tokens=budget)
        outs[be] = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], sp)]
        outs[be] += [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]     # prefix hits
        if be == "triton":
            assert llm.engine.runner.backend.flash_prefix
    assert outs["triton"] == outs["torch_ref"]


def test_choose_kernel_takes_cudnn_only_when_it_runs_and_agrees(monkeypatch):
    """The per-process choice between cuDNN's attention and the flash kernel, with stand-in kernels on the
    CPU: cuDNN when it agrees with flash, flash when it differs, fails, or is not wanted."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))

    def exact(q, k, v, scale, causal):
        return flash_prefix.attend_lse(q[0], k[0], v[0], scale, causal)     # the plain path on the CPU

    def off_by(d):
        def run(q, k, v, scale, causal):
            o, lse = exact(q, k, v, scale, causal)
            return o + d, lse
        return run

    def broken(*a):
        raise RuntimeError("no cuDNN here")

    monkeypatch.delenv("TIERSERVE_PREFILL_ATTN", raising=False)
    pick = flash_prefix.choose_kernel
    assert pick(q, k, v, 0.3, True, {"cudnn": off_by(0.0), "flash": exact}) == "flash"      # the default
    monkeypatch.setenv("TIERSERVE_PREFILL_ATTN", "auto")
    assert pick(q, k, v, 0.3, True, {"cudnn": off_by(1e-3), "flash": exact}) == "cudnn"
    assert pick(q, k, v, 0.3, True, {"cudnn": off_by(0.5), "flash": exact}) == "flash"
    assert pick(q, k, v, 0.3, False, {"cudnn": broken, "flash": exact}) == "flash"
    monkeypatch.setenv("TIERSERVE_PREFILL_ATTN", "flash")
    assert pick(q, k, v, 0.3, True, {"cudnn": off_by(0.0), "flash": exact}) == "flash"
    monkeypatch.setenv("TIERSERVE_PREFILL_ATTN", "cudnn")
    assert pick(q, k, v, 0.3, True, {"cudnn": off_by(0.5), "flash": exact}) == "cudnn"
    monkeypatch.setenv("TIERSERVE_PREFILL_ATTN", "fast")
    with pytest.raises(ValueError, match="TIERSERVE_PREFILL_ATTN"):
        pick(q, k, v, 0.3, True, {"cudnn": exact, "flash": exact})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN / flash kernels need CUDA")
def test_cudnn_and_flash_kernels_agree_on_the_gpu():
    """Both CUDA kernels against the plain path, causal and not, query heads folded as chunk_attention does."""
    torch.manual_seed(1)
    q = torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for causal in (True, False):
        want_o, want_l = flash_prefix.attend_lse(q[0].float(), k[0].float(), v[0].float(), 0.09, causal)
        for name, run in flash_prefix.KERNELS.items():
            try:
                o, lse = run(q, k, v, 0.09, causal)
            except RuntimeError as e:
                if name == "cudnn":
                    pytest.skip(f"cuDNN attention does not run here: {e}")
                raise
            torch.testing.assert_close(o[0].float(), want_o, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse[0], want_l, atol=1e-3, rtol=1e-3)
