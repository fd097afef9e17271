"""Tiered KV (CPU RAM, disk, Redis): hits across requests and processes, identical output, failures."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.redis_server import free_port, redis_server
from tests.helpers.tiny_models import make_checkpoint
from tierserve import LLM, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPT = [0] + [(7 * i + 3) % 500 + 3 for i in range(150)]       # 151 tokens: 9 full pages of 16
OTHER = [0] + [(11 * i + 5) % 500 + 3 for i in range(150)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiers") / "llama", "llama")


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=256, enable_prefix_caching=False)
    return {k: llm.generate([p], SP)[0].outputs[0].token_ids for k, p in (("p", PROMPT), ("o", OTHER))}


def make(ckpt, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_load_policy", "always")
    return LLM(str(ckpt), dtype="float32", device="cpu", **kw)


def assert_clean(llm):
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.pool.num_in_use == 0


def test_cpu_tier_hit_after_gpu_eviction(ckpt, reference):
    # 17 GPU pages (272 tokens): running OTHER evicts PROMPT's cached pages, which go to CPU RAM
    llm = make(ckpt, num_kv_pages=17, cpu_kv_gb=0.01)
    a = llm.generate([PROMPT], SP)[0]
    b = llm.generate([OTHER], SP)[0]
    c = llm.generate([PROMPT], SP)[0]
    assert a.outputs[0].token_ids == c.outputs[0].token_ids == reference["p"]
    assert b.outputs[0].token_ids == reference["o"]
    assert c.num_cached_tokens >= len(PROMPT) - 16
    assert c.cached_tokens_by_tier.get("cpu", 0) > 0
    assert llm.engine.kv.tiers.hits["cpu"] > 0
    assert_clean(llm)


def test_same_prompt_twice_gpu_hit(ckpt, reference):
    llm = make(ckpt, cpu_kv_gb=0.01)
    llm.generate([PROMPT], SP)
    out = llm.generate([PROMPT], SP)[0]
    assert out.num_cached_tokens >= len(PROMPT) - 16
    assert out.cached_tokens_by_tier == {"gpu": out.num_cached_tokens}
    assert out.outputs[0].token_ids == reference["p"]


RUN = """
import json, sys
from tierserve import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", device="cpu", max_model_len=256, disk_kv_dir=sys.argv[2],
          kv_load_policy="always")
out = llm.generate([json.loads(sys.argv[3])], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
llm.engine.kv.tiers.flush()
print(json.dumps({"tokens": out.outputs[0].token_ids, "cached": out.num_cached_tokens,
                  "tiers": out.cached_tokens_by_tier}))
"""


def run_process(ckpt, disk, prompt):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    res = subprocess.run([sys.executable, "-c", RUN, str(ckpt), str(disk), json.dumps(prompt)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def test_disk_tier_across_processes_and_corruption(ckpt, reference, tmp_path):
    disk = tmp_path / "kv"
    a, _ = run_process(ckpt, disk, PROMPT)                 # process A fills the disk cache
    assert a["tokens"] == reference["p"] and a["cached"] == 0
    files = sorted(disk.glob("*.kvp"))
    assert len(files) >= 9
    b, _ = run_process(ckpt, disk, PROMPT)                 # process B: fresh engine, disk hits
    assert b["tokens"] == reference["p"]
    assert b["tiers"].get("disk", 0) >= len(PROMPT) - 16
    for f in disk.glob("*.kvp"):                           # flip bytes in every stored block
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    c, err = run_process(ckpt, disk, PROMPT)               # process C: detects, recomputes, same output
    assert c["tokens"] == reference["p"]
    assert c["cached"] == 0 and "disk" not in c["tiers"]
    assert "rejected" in err and "checksum" in err


def test_foreign_blocks_are_refused(ckpt, reference, tmp_path):
    other = make_checkpoint(tmp_path / "other", "llama", seed=1)
    disk = tmp_path / "kv"
    make(other, disk_kv_dir=str(disk)).generate([PROMPT], SP)
    time.sleep(0.2)
    llm = make(ckpt, disk_kv_dir=str(disk))
    llm.engine.kv.tiers.disk.flush()
    out = llm.generate([PROMPT], SP)[0]
    assert out.outputs[0].token_ids == reference["p"]
    assert "disk" not in out.cached_tokens_by_tier


def test_unwritable_disk_dir_warns_and_continues(ckpt, reference, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        llm = make(ckpt, disk_kv_dir=str(blocker / "kv"))
    assert "disk KV tier disabled" in caplog.text
    assert llm.generate([PROMPT], SP)[0].outputs[0].token_ids == reference["p"]


def test_cost_model_prefers_recompute_when_faster(ckpt, tmp_path):
    from tierserve.kv.tiers.manager import TierHit, TierManager
    tm = TierManager((2, 4), __import__("torch").float32, "fp", host_pages=4)
    hits = [TierHit(b"h", (1,), "disk")] * 3
    tm.bandwidth["disk"] = 1e3                 # 1 KB/s disk
    tm.observe_prefill(1000, 1e-3)             # 1 us per token of prefill
    assert not tm._load_pays(hits, page_size=16)
    tm.bandwidth["disk"] = 1e12
    assert tm._load_pays(hits, page_size=16)


@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    assert exe, "redis-server is required for the remote-tier tests (apt-get install redis-server)"
    with redis_server(exe) as url:
        yield url


def test_two_engines_share_redis(ckpt, reference, redis_url):
    a = make(ckpt, remote_kv_url=redis_url)
    assert a.generate([PROMPT], SP)[0].outputs[0].token_ids == reference["p"]
    a.engine.kv.tiers.flush()
    b = make(ckpt, remote_kv_url=redis_url)
    out = b.generate([PROMPT], SP)[0]
    assert out.outputs[0].token_ids == reference["p"]
    assert out.cached_tokens_by_tier.get("remote", 0) >= len(PROMPT) - 16


def test_unreachable_redis_does_not_block(ckpt, reference, caplog):
    llm = make(ckpt, remote_kv_url=f"redis://127.0.0.1:{free_port()}/0")
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        out = llm.generate([PROMPT], SP)[0]
    assert out.outputs[0].token_ids == reference["p"]
    assert time.time() - t0 < 10
    assert "unreachable" in caplog.text


def test_cache_cli_stats_and_clear(ckpt, tmp_path):
    from typer.testing import CliRunner

    from tierserve.cli import app
    disk = tmp_path / "kv"
    llm = make(ckpt, disk_kv_dir=str(disk))
    llm.generate([PROMPT], SP)
    llm.engine.kv.tiers.flush()
    n = len(list(disk.glob("*.kvp")))
    assert n >= 9
    r = CliRunner().invoke(app, ["cache", "stats", "--disk-kv-dir", str(disk)])
    assert r.exit_code == 0 and f"blocks  {n}" in r.output
    r = CliRunner().invoke(app, ["cache", "clear", "--disk-kv-dir", str(disk)])
    assert r.exit_code == 0 and not list(disk.glob("*.kvp"))
    r = CliRunner().invoke(app, ["cache", "stats", "--disk-kv-dir", str(tmp_path / "missing")])
    assert r.exit_code == 2


@pytest.mark.parametrize("caching", [True, False])
def test_live_sequence_larger_than_gpu_pool_spills_to_cpu(ckpt, caching):
    """6 GPU pages (96 tokens) for requests of ~190 tokens: cold pages live in CPU RAM, output unchanged."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [PROMPT, OTHER[:120]]
    ref = make(ckpt, enable_prefix_caching=False).generate(prompts, sp)
    llm = make(ckpt, num_kv_pages=6, cpu_kv_gb=0.01, max_num_batched_tokens=16,
               enable_prefix_caching=caching)
    outs = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    kv = llm.engine.kv
    assert kv.num_spilled > 0
    assert kv.tiers.host.num_spilled == 0          # every spilled slot released at the end
    kv.tiers.check_invariants()
    assert_clean(llm)


def test_prompt_chunk_larger_than_gpu_pool_is_split_to_fit(ckpt):
    """The default chunk (the whole prompt) needs more pages than the GPU pool has: the scheduler halves the
    chunk until it fits and earlier pages spill, instead of waiting forever (the engine used to spin with an
    empty schedule: found by the H200 kernel tests). Output unchanged."""
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [PROMPT, OTHER[:150]]
    assert min(len(p) for p in prompts) > 6 * 16
    ref = make(ckpt, enable_prefix_caching=False).generate(prompts, sp)
    llm = make(ckpt, num_kv_pages=6, cpu_kv_gb=0.01, enable_prefix_caching=False)
    outs = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.engine.kv.num_spilled > 0
    assert_clean(llm)


def test_pool_smaller_than_max_model_len_needs_cpu_tier(ckpt):
    with pytest.raises(ValueError, match="max_model_len"):
        make(ckpt, num_kv_pages=6)


def test_live_sequence_spills_to_disk_behind_cpu(ckpt, tmp_path):
    """A 6-page GPU pool, CPU RAM for only a few pages, the disk behind it: output unchanged."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [PROMPT, OTHER[:120]]
    ref = make(ckpt, enable_prefix_caching=False).generate(prompts, sp)
    page_bytes = 2 * 2 * 16 * 2 * 16 * 4          # layers * K/V * tokens * kv heads * head dim * fp32
    llm = make(ckpt, num_kv_pages=6, cpu_kv_gb=4 * page_bytes / 2**30, disk_kv_dir=str(tmp_path / "kv"),
               max_num_batched_tokens=16, enable_prefix_caching=False)
    tiers = llm.engine.kv.tiers
    assert tiers.host.num_pages <= 4 and tiers.disk_spill is not None
    used = []
    orig = tiers.spill_reserve

    def spy():
        slot = orig()
        used.append(slot)
        return slot
    tiers.spill_reserve = spy
    outs = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert any(s is not None and s >= tiers.host.num_pages for s in used)     # pages really went to disk
    assert tiers.disk_spill.num_used == 0 and tiers.host.num_spilled == 0
    assert_clean(llm)


def test_blocks_of_another_page_layout_are_refused(ckpt, reference, tmp_path):
    """Sparse attention keeps a key summary row inside each page: its blocks must not load without it."""
    disk = tmp_path / "kv"
    sparse = make(ckpt, disk_kv_dir=str(disk), sparse_attention="pages", sparse_topk_tokens=512)
    sparse.generate([PROMPT], SP)
    sparse.engine.kv.tiers.flush()
    assert list(disk.glob("*.kvp"))
    out = make(ckpt, disk_kv_dir=str(disk)).generate([PROMPT], SP)[0]
    assert out.outputs[0].token_ids == reference["p"]
    assert "disk" not in out.cached_tokens_by_tier


def test_sparse_selection_counts_decide_what_spills(ckpt):
    """With sparse attention and a pool smaller than the sequence, the pages attention chooses least spill
    first: the sink page (always chosen) stays on the device while later pages go to CPU RAM. Placement
    never changes the output."""
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    kw = dict(sparse_attention="pages", sparse_topk_tokens=96, enable_prefix_caching=False,
              max_num_batched_tokens=16)
    ref = make(ckpt, **kw).generate([PROMPT], sp)[0].outputs[0].token_ids
    llm = make(ckpt, num_kv_pages=9, max_model_len=192, cpu_kv_gb=0.01, **kw)
    eng = llm.engine
    assert eng.runner.page_heat is not None and eng.kv.page_heat is not None
    eng.add_request("r", PROMPT, sp)
    sink_spilled, spilled_any, out = False, False, None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
        t = eng.kv._tables.get("r")
        if t is not None:
            spilled_any |= any(p < 0 for p in t.pages)
            sink_spilled |= t.pages[0] < 0
    assert spilled_any and not sink_spilled
    assert out.outputs[0].token_ids == ref


def test_cold_device_pages_make_room_for_hot_spilled_ones(ckpt):
    """A full pool with sparse attention: spilled pages chosen far more often than device pages swap in
    (demote_cold spills the cold ones, promote_hot brings the hot ones back at the next step). Placement never
    changes the output; every page is accounted for at the end. One step at a time: with multi-step windows
    (opt-in over tiers) placement moves happen only between queues of windows (docs/tiers.md)."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(sparse_attention="pages", sparse_topk_tokens=96, enable_prefix_caching=False,
              max_num_batched_tokens=16, num_scheduler_steps=1)
    ref = make(ckpt, **kw).generate([PROMPT], sp)[0].outputs[0].token_ids
    llm = make(ckpt, num_kv_pages=9, max_model_len=256, cpu_kv_gb=0.01, debug_invariants=True, **kw)
    llm.engine.kv.rebalance_every = 1
    assert llm.generate([PROMPT], sp)[0].outputs[0].token_ids == ref
    kv = llm.engine.kv
    assert kv.num_demoted > 0 and kv.num_promoted > 0
    assert_clean(llm)
    kv.tiers.check_invariants()


def test_rebalance_counts_the_steps_of_windows():
    """``rebalance(n, steps)``: demotion every ``rebalance_every`` decode steps, whether they came one per call or
    as queues of multi-step windows between two calls; promotion at every call."""
    from tierserve.kv.spill_placement import SpillPlacement

    class Stub(SpillPlacement):
        slot_heat = object()
        rebalance_every = 16

        def __init__(self):
            self.calls = []

        def promote_hot(self, reserve):
            self.calls.append("promote")

        def demote_cold(self, reserve):
            self.calls.append("demote")
    one, win = Stub(), Stub()
    for _ in range(48):
        one.rebalance(1)
    for _ in range(3):
        win.rebalance(1, steps=16)
    assert one.calls.count("demote") == win.calls.count("demote") == 3
    assert one.calls.count("promote") == 48 and win.calls.count("promote") == 3
    odd = Stub()
    for n in (10, 10, 10, 2):            # crossings of 16 and 32
        odd.rebalance(1, steps=n)
    assert odd.calls.count("demote") == 2


def test_rebalance_every_from_the_environment(monkeypatch):
    """``TIERSERVE_REBALANCE_EVERY``: 64 by default, an integer >= 0, a clear error otherwise."""
    from tierserve.kv.spill_placement import _rebalance_every

    monkeypatch.delenv("TIERSERVE_REBALANCE_EVERY", raising=False)
    assert _rebalance_every() == 64
    monkeypatch.setenv("TIERSERVE_REBALANCE_EVERY", "16")
    assert _rebalance_every() == 16
    for bad in ("-1", "x", "1.5"):
        monkeypatch.setenv("TIERSERVE_REBALANCE_EVERY", bad)
        with pytest.raises(ValueError, match="TIERSERVE_REBALANCE_EVERY must be an integer >= 0"):
            _rebalance_every()


@pytest.mark.parametrize("in_queue", [False, True])
def test_windows_queue_and_rebalance_every(ckpt, monkeypatch, in_queue):
    """With windows over the tiers and page moves that need a host sync (``MOVES_IN_QUEUE`` off) a queue of windows
    ends after about ``rebalance_every`` decode steps (the engine rebalances between queues); with moves queued
    inside (the default where they need no sync, always on the CPU) the queue runs on whatever ``rebalance_every``
    is. Counted by the windows launched fresh (``launch_multi``), for the same tokens."""
    from tierserve import LLM, SamplingParams
    from tierserve.engine import multi_step as engine_multi
    from tierserve.runner import multi_step

    monkeypatch.setattr(multi_step, "TIERED", True)
    monkeypatch.setattr(engine_multi, "MOVES_IN_QUEUE", in_queue)
    prompt = [0] + [(7 * i + 3) % 500 + 3 for i in range(150)]
    sp = SamplingParams(temperature=0, max_tokens=66, ignore_eos=True)
    got = {}
    for every in (16, 64):
        llm = LLM(str(ckpt), dtype="float32", max_model_len=256, page_size=8, num_kv_pages=12, cpu_kv_gb=0.01,
                  enable_prefix_caching=False, sparse_attention="pages", sparse_topk_tokens=88, num_scheduler_steps=8)
        llm.engine.kv.rebalance_every = every
        launched, real = [], llm.engine.runner.launch_multi
        llm.engine.runner.launch_multi = lambda *a, **k: launched.append(1) or real(*a, **k)
        out = llm.generate([prompt], sp)[0].outputs[0].token_ids
        assert llm.engine.kv.num_spilled > 0
        got[every] = (out, len(launched))
    assert got[16][0] == got[64][0]
    if in_queue:
        assert got[16][1] == got[64][1] == 1
    else:
        assert got[16][1] >= 3 and got[64][1] < got[16][1]


def test_placement_moves_under_multi_step_windows(ckpt, monkeypatch):
    """The same full pool with multi-step windows over the tiers (``TIERSERVE_TIERED_MULTI_STEP=1``): cold device
    pages still go down between queues, and the tokens are those of the reference."""
    from tierserve.runner import multi_step

    monkeypatch.setattr(multi_step, "TIERED", True)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(sparse_attention="pages", sparse_topk_tokens=96, enable_prefix_caching=False,
              max_num_batched_tokens=16)
    ref = make(ckpt, **kw).generate([PROMPT], sp)[0].outputs[0].token_ids
    llm = make(ckpt, num_kv_pages=9, max_model_len=256, cpu_kv_gb=0.01, debug_invariants=True, **kw)
    llm.engine.kv.rebalance_every = 1
    assert llm.generate([PROMPT], sp)[0].outputs[0].token_ids == ref
    assert llm.engine.kv.num_demoted > 0
    assert_clean(llm)
    llm.engine.kv.tiers.check_invariants()


def test_hot_spilled_pages_come_back_when_pages_free_up(ckpt):
    """A second request holds pool pages while the first spills; once it finishes, the first request's
    most chosen spilled pages are promoted back into the freed GPU pages. Outputs never change."""
    kw = dict(sparse_attention="pages", sparse_topk_tokens=96, enable_prefix_caching=False,
              max_num_batched_tokens=16)
    long_sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    short_sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = OTHER[:40]
    ref_long = make(ckpt, **kw).generate([PROMPT], long_sp)[0].outputs[0].token_ids
    ref_short = make(ckpt, **kw).generate([short], short_sp)[0].outputs[0].token_ids
    llm = make(ckpt, num_kv_pages=12, max_model_len=192, cpu_kv_gb=0.01, debug_invariants=True, **kw)
    outs = llm.generate([PROMPT, short], [long_sp, short_sp])
    assert outs[0].outputs[0].token_ids == ref_long and outs[1].outputs[0].token_ids == ref_short
    kv = llm.engine.kv
    assert kv.num_spilled > 0 and kv.num_promoted > 0
    assert_clean(llm)
    kv.tiers.check_invariants()


def test_hottest_spilled_slots_from_the_device_top_k_match_a_full_scan():
    """``promote_hot`` / ``demote_cold`` take the most chosen spilled slots from the device's top-k counts (O(k))
    instead of reading every spilled slot's count: the same slots, the most chosen first; slots chosen zero times
    and released slots (stale counts) never come back."""
    import torch

    from tierserve.kv.manager import KVManager, _Table

    heat = torch.tensor([0.0, 5.0, 9.0, 1.0, 7.0, 0.0, 3.0, 8.0, 2.0, 6.0])
    kv = KVManager(num_pages=4, page_size=16, enable_prefix_caching=False)
    kv.host_ram_slots = 10
    t = _Table(pages=[-(s + 1) for s in (1, 3, 4, 5, 6, 8, 9)])      # slots 0, 2, 7: not (or no longer) spilled
    kv._spilled_at = {-p - 1: (t, i) for i, p in enumerate(t.pages)}
    kv.slot_heat = lambda slots: heat[slots].tolist()
    for k in (1, 3, 6, 10):
        kv.slot_top = None
        scan = kv._hottest(k)
        kv.slot_top = lambda n: (torch.topk(heat, n).indices.tolist(), torch.topk(heat, n).values.tolist())
        assert kv._hottest(k) == scan
        assert [s for s, _ in scan] == [4, 9, 1, 6, 8, 3][:k]          # slot 5 (zero) never, 2 and 7 not spilled
