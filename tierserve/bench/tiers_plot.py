"""The PNG of `bench tiers`: TTFT per hit path and context (log scale, with what the cost policy chose), and
decode tok/s against the share of the KV on the GPU, transformers' two caches as horizontal lines."""
from __future__ import annotations

from pathlib import Path

from tierserve.bench.plot import save_figure
from tierserve.bench.tiers_ttft import HITS


def plot_tiers(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ttft = [r for r in rows if r["kind"] == "ttft" and "ttft_s" in r]
    contexts = sorted({r["context"] for r in ttft})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    width = 0.8 / max(1, len(contexts))
    for j, ctx in enumerate(contexts):
        by_hit = {r["hit"]: r for r in ttft if r["context"] == ctx}
        xs = [i + j * width for i, h in enumerate(HITS) if h in by_hit]
        ys = [by_hit[h]["ttft_s"] for h in HITS if h in by_hit]
        bars = ax.bar(xs, ys, width, label=f"{ctx // 1024}k tokens" if ctx >= 1024 else f"{ctx} tokens")
        for b, h in zip(bars, [h for h in HITS if h in by_hit]):
            note = f"{b.get_height():.2f}s"
            if h == "disk-policy":
                note += f"\n{by_hit[h].get('policy_choice', '')}"
            ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=6)
    ax.set_xticks([i + width * (len(contexts) - 1) / 2 for i in range(len(HITS))], HITS, fontsize=8)
    ax.set(yscale="log", ylabel="TTFT (s)", title="TTFT: cold vs prefix hit per tier")
    ax = axes[1]
    dec = [r for r in rows if r["kind"] == "decode" and r.get("tok_s")]
    ours = sorted((r["gpu_frac"], r["tok_s"]) for r in dec if r["engine"] == "tierserve")
    if ours:
        ax.plot(*zip(*ours), marker="o", label="tierserve (rest of the KV in CPU RAM)")
        for x, y in ours:
            ax.annotate(f"{y:.1f}", (x, y), fontsize=7, xytext=(2, 3), textcoords="offset points")
    for r in dec:
        if r["engine"] == "transformers":
            ax.axhline(r["tok_s"], ls="--", color="gray" if r.get("cache") == "dynamic" else "red",
                       label=f"transformers {r.get('cache')} cache: {r['tok_s']:.2f} tok/s")
    ctx = next((r["context"] for r in dec), None)
    ax.set(xlabel="share of the sequence's KV pages on the GPU", ylabel="decode tok/s (batch 1)", yscale="log",
           title=f"decode at {ctx} tokens" if ctx else "decode")
    for a in axes:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    meta = result["meta"]
    return save_figure(fig, path, f"bench tiers -- {meta.get('device', '')}, {meta.get('date', '')}")
