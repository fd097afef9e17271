"""Quality check of an idea not built (issue 6; benchmarks/RUNBOOK.md): each layer reusing the page selection of an
earlier decode step for R steps (the sink, recent and own pages still added fresh), which would skip the page scores
and the top-k (~1 ms a token at 128k on the H200) in R-1 of every R steps. On the CPU with tierserve-nano and the
torch reference backend, ``select.select_pages`` wrapped -- no engine code changes. Per R:

* ``kept``: the share of the fresh selection's competing pages (chosen by score, not forced) that the reused one holds,
  per layer, over every decode step that reused;
* ``same_tokens``: greedy tokens equal to R=1's (sparse, fresh selection every step), and the first difference;
* the same against dense attention, for scale (how far plain sparse already is from dense).

    PYTHONPATH=. python scripts/selection_reuse_quality.py [--prompts 8] [--context 960] [--new 48] \\
        [--topk 256] [--reuse 1,2,4,8] [--output benchmarks/results/selection-reuse-cpu-nano.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from tierserve.attention import select as sel
from tierserve.attention import torch_ref

ORIG = sel.select_pages


def forced_pages(q_pos: torch.Tensor, P: int, page: int, cfg) -> torch.Tensor:
    """[B, 1, Q, P]: the pages select_pages always keeps (sink, recent window, the query's own page), visible."""
    start = torch.arange(P) * page
    pos = q_pos[:, :, None]
    forced = (start < cfg.sink_tokens) | (start + page > pos - cfg.recent_tokens) | \
        (torch.arange(P) == pos // page)
    return (forced & (start <= pos))[:, None]


class Reuse:
    """select_pages for the torch reference backend: decode steps (one query) of each layer reuse the competing pages
    chosen ``R`` - 1 steps before at most; layers are told apart by call order (one call a layer a step)."""

    def __init__(self, R: int, layers: int):
        self.R, self.layers, self.calls = R, layers, 0
        self.state: dict[int, tuple[torch.Tensor, int]] = {}
        self.kept = [[0, 0] for _ in range(layers)]         # per layer: competing fresh pages held, of

    def __call__(self, ub, q_pos, seq_lens, page, cfg):
        fresh = ORIG(ub, q_pos, seq_lens, page, cfg)
        layer = self.calls % self.layers
        self.calls += 1
        B, H, Q, P = ub.shape
        if Q != 1 or self.R == 1 or bool((q_pos + 1 <= cfg.topk_tokens).any()):
            self.state[layer] = (fresh, 1)
            return fresh
        stale, age = self.state.get(layer, (None, self.R))
        if stale is None or age >= self.R or stale.shape != fresh.shape:
            self.state[layer] = (fresh, 1)
            return fresh
        forced = forced_pages(q_pos, P, page, cfg)
        out = stale | forced
        competing = fresh & ~forced
        self.kept[layer][0] += int((out & competing).sum())
        self.kept[layer][1] += int(competing.sum())
        self.state[layer] = (stale, age + 1)
        return out


def prompts_from_corpus(tok, n: int, context: int) -> list[list[int]]:
    from tierserve.train.corpus import collect_corpus, read_text
    c = collect_corpus()
    out = []
    for p in c.heldout_files:
        ids = tok.encode(read_text(p))
        for s in range(0, len(ids) - context, context):
            out.append(ids[s:s + context])
            if len(out) == n:
                return out
    if not out:
        raise SystemExit(f"no held-out document has {context} tokens")
    return out


def run(prompts, settings: dict, new: int, reuse: Reuse | None):
    from tierserve import LLM, SamplingParams
    torch_ref.select_pages = reuse if reuse is not None else ORIG
    try:
        llm = LLM(None, device="cpu", attention_backend="torch_ref", enable_prefix_caching=False,
                  max_model_len=max(len(p) for p in prompts) + new + 16, **settings)
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    finally:
        torch_ref.select_pages = ORIG


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
    return {"same_tokens": round(same, 4), "first_difference_mean": round(sum(first) / len(first), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--context", type=int, default=960)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--reuse", default="1,2,4,8")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    from tierserve import LLM
    probe = LLM(None, device="cpu", max_model_len=64)
    layers = probe.engine.model_cfg.num_layers
    prompts = prompts_from_corpus(probe.get_tokenizer(), a.prompts, a.context)
    del probe
    sparse = {"sparse_attention": "pages", "sparse_topk_tokens": a.topk}
    t0 = time.time()
    dense = run(prompts, {}, a.new, None)
    rows, base = [], None
    for R in (int(x) for x in a.reuse.split(",")):
        reuse = Reuse(R, layers)
        toks = run(prompts, sparse, a.new, reuse)
        base = toks if R == 1 else base
        kept = [round(k / n, 4) if n else None for k, n in reuse.kept]
        row = {"reuse_steps": R, "kept_per_layer": kept, "vs_dense": agreement(dense, toks)}
        if base is not None and R != 1:
            row["vs_fresh_sparse"] = agreement(base, toks)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"meta": {"tool": "scripts/selection_reuse_quality.py", "settings": vars(a), "model": "tierserve-nano",
                       "backend": "torch_ref", "device": "cpu", "layers": layers, "wall_s": round(time.time() - t0, 1),
                       "torch": torch.__version__},
              "rows": rows}
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
