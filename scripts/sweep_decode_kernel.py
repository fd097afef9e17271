"""Tune the Triton paged decode kernel on the GPU: time (inside a CUDA graph, 32 calls like 32 layers)
each (splits, block_n, warps, stages) at Llama-8B attention shapes; print the best per case as JSON."""
import itertools, json, os
import torch
from tierserve.attention.backend import choose_splits
from tierserve.attention.triton_decode import paged_decode

dev = torch.device("cuda")
HQ, HKV, D, PAGE = 32, 8, 128, 16
sms = torch.cuda.get_device_properties(dev).multi_processor_count
cases = [(1, 2048), (1, 32768), (16, 2048), (64, 2048), (1, 131072)]
res = {}
for B, ctx in cases:
    pages_per = ctx // PAGE + 1
    N = B * pages_per + 1
    kv = torch.randn(N, 2, PAGE, HKV, D, device=dev, dtype=torch.bfloat16)
    kc, vc = kv[:, 0], kv[:, 1]
    table = torch.randperm(N - 1, device=dev)[:B * pages_per].view(B, pages_per)
    seq = torch.full((B,), ctx, device=dev)
    q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16)
    auto = choose_splits(B, HKV, 131072 + 128, sms)
    nbytes = B * ctx * HKV * D * 2 * 2
    rows = []
    for splits, bn, nw, ns in itertools.product(sorted({auto, max(1, auto // 2), min(64, auto * 2)}),
                                                (32, 64, 128), (4, 8), (2, 3)):
        try:
            out = torch.empty_like(q)
            kw = dict(num_splits=splits, block_n=bn, num_warps=nw, num_stages=ns, out=out)
            paged_decode(q, kc, vc, table, seq, 0.088, **kw)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(32):
                    paged_decode(q, kc, vc, table, seq, 0.088, **kw)
            g.replay(); torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(7):
                s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 32)
            us = sorted(ts)[3] * 1e3
            rows.append({"splits": splits, "block_n": bn, "warps": nw, "stages": ns, "us": round(us, 2),
                         "TBps": round(nbytes / us / 1e6, 3)})
        except Exception as ex:  # a config that does not compile (shared memory) is skipped
            rows.append({"splits": splits, "block_n": bn, "warps": nw, "stages": ns, "error": type(ex).__name__})
    ok = sorted([r for r in rows if "us" in r], key=lambda r: r["us"])
    default = [r for r in ok if r["splits"] == auto and r["block_n"] == 64 and r["warps"] == 4 and r["stages"] == 2]
    res[f"b{B}_c{ctx}"] = {"auto_splits": auto, "best": ok[:5], "default": default}
    print(B, ctx, "auto", auto, "default", default, "best", ok[:3], flush=True)
    del kv, kc, vc
    torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/sweep_decode.json", "w"), indent=1)
