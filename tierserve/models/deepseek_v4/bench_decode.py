"""Decode tok/s of a DeepSeek-V4 checkpoint in the engine, batched decode vs one request per forward.

    python -m tierserve.models.deepseek_v4.bench_decode [--model DIR] [--batch 1 4 8] [--new 200]

Without ``--model`` it builds the tiny "mixed" test checkpoint (tests/helpers/tiny_deepseek_v4.py; run
from the repository root, needs transformers). Per batch size ``B`` and path it generates ``new``
greedy tokens for ``B`` prompts of ``--prompt`` tokens and subtracts the time of the same call with
one new token (prefill + first token): decode tok/s = ``B * (new - 1) / (t_new - t_1)``, the best of
``--repeat`` runs. One torch thread unless ``--threads``. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tierserve import LLM, SamplingParams

    path = args.model
    if path is None:
        from tests.helpers.tiny_deepseek_v4 import make_checkpoint
        from tierserve.loader.tokenizer import Tokenizer

        path = make_checkpoint(tempfile.mkdtemp(prefix="v4bench-"), "mixed")
        Tokenizer.synthetic(128).backend.save(str(path / "tokenizer.json"))
    llm = LLM(str(path), dtype=args.dtype, device=args.device, max_model_len=args.prompt + args.new + 8,
              enable_prefix_caching=False)
    runner = llm.engine.runner
    g = torch.Generator().manual_seed(0)
    vocab = runner.model.config.vocab_size
    for B in args.batch:
        prompts = [torch.randint(2, vocab, (args.prompt,), generator=g).tolist() for _ in range(B)]
        tokens = {}
        for batched in (False, True):
            runner.batch_decode = batched
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
                t1 = time.perf_counter()
                outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True))
                t2 = time.perf_counter()
                best = min(best, (t2 - t1) - (t1 - t0))
            tokens[batched] = [o.outputs[0].token_ids for o in outs]
            print(json.dumps({"batch": B, "path": "batched" if batched else "per-request",
                              "decode_tok_s": round(B * (args.new - 1) / best, 1), "context": args.prompt + args.new,
                              "threads": args.threads, "device": args.device, "dtype": args.dtype}), flush=True)
        print(json.dumps({"batch": B, "same_tokens": tokens[False] == tokens[True]}), flush=True)


if __name__ == "__main__":
    main()
