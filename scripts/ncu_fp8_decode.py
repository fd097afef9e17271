"""One launch each of the BF16 and the FP8 decode kernels (batch 16, 32k context, Llama-3.1-8B attention shapes,
old pages stored FP8), for Nsight Compute: ``ncu --clock-control none -k regex:decode_split python
scripts/ncu_fp8_decode.py [key=value,...]`` (FP8 launch settings as in attention/fp8_decode_config). Why the FP8
kernel moves ~0.6 TB/s where the BF16 one moves 3.4 (benchmarks/results/fp8-kv-pipeline-h200.json)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fp8_kv as B  # noqa: E402


def main() -> None:
    from tierserve.attention.backend import choose_splits
    from tierserve.attention.fp8_decode_config import parse
    from tierserve.attention.triton_decode import paged_decode
    from tierserve.attention.triton_decode_fp8 import paged_decode_fp8
    from tierserve.attention.triton_fp8_quant import quantise_pages_triton

    cfg = parse(sys.argv[1] if len(sys.argv) > 1 else "", "settings")
    batch, ctx, dev = 16, 32768, torch.device("cuda")
    data, table = B.pool(batch, ctx, dev, torch.bfloat16)
    kv = data[:, 0]
    seq = torch.full((batch,), ctx, device=dev)
    q = torch.randn(batch, B.HQ, B.D, device=dev, dtype=torch.bfloat16)
    splits = choose_splits(batch, B.HKV, ctx + 144, torch.cuda.get_device_properties(dev).multi_processor_count)
    flags = torch.zeros(data.shape[0], dtype=torch.bool, device=dev)
    old = torch.tensor(B.old_pages(table, ctx), device=dev)
    quantise_pages_triton(data, old, B.PAGE)
    flags[old] = True
    cfg = {"num_splits": splits, **cfg}
    for _ in range(2):      # the first call compiles
        paged_decode(q, kv[:, 0], kv[:, 1], table, seq, B.D ** -0.5, num_splits=splits)
        paged_decode_fp8(q, kv, flags, table, seq, B.D ** -0.5, B.PAGE, B.SINK, B.RECENT, **cfg)
    torch.cuda.synchronize()
    print("settings", cfg)


if __name__ == "__main__":
    main()
