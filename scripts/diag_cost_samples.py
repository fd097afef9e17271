"""Diagnostic: the recompute cost model's prefill samples after 32k and 128k cold prefills (H200)."""
import tempfile, sys
sys.path.insert(0, ".")
from tierserve import LLM
from tierserve.bench.tiers import _prompt
from tierserve.bench.tiers_ttft import ttft, hit_paths

with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as disk:
    llm = LLM("llama-3.1-8b", load_format="dummy", cpu_kv_gb=30, disk_kv_dir=disk, kv_prefetch=False,
              kv_load_policy="cost", max_num_seqs=4, max_model_len=131072 + 64)
    eng = llm.engine; tiers = eng.kv.tiers; vocab = eng.model_cfg.vocab_size
    log = []
    orig = tiers.step_done
    def step_done(n, att):
        log.append((n, att, tiers._apply_s, tiers._overlapped, len(tiers.step_timer._pending)))
        return orig(n, att)
    tiers.step_done = step_done
    for ctx in (32768, 131072):
        warm = _prompt(vocab, min(ctx, 2 * eng.config.max_num_batched_tokens + 17), -ctx % 2**31)
        hit_paths(llm, warm, disk, "cost")
        s, _, _ = ttft(llm, _prompt(vocab, ctx, ctx))
        p = tiers.cost.prefill
        print(ctx, "cold", round(s, 3), "pending", len(tiers.step_timer._pending), "a", p.a, "b", p.b,
              "est", p.estimate(ctx), flush=True)
        s2, _, _ = ttft(llm, _prompt(vocab, ctx, ctx))
        print(" after gpu hit: pending", len(tiers.step_timer._pending), "est", p.estimate(ctx))
    print("samples (tokens, ctx, us/token):")
    for n, c, y in p.samples: print(f"  {n:6.0f} {c:9.0f} {y*1e6:8.2f}")
    print("step log (n, attended, apply_s, overlapped, pending):")
    for r in log:
        if r[0]: print("  ", r)
