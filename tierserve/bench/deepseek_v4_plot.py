"""PNG of ``bench deepseek-v4``: decode tok/s and TTFT against context, one line per engine (a point for the
``--cpu-experts`` row), out-of-memory contexts marked."""
from __future__ import annotations

from pathlib import Path

from tierserve.bench.plot import save_figure


def plot_deepseek_v4(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    engines = list(dict.fromkeys(r["engine"] for r in result["rows"]))       # tierserve, transformers, (cpu experts)
    for eng in engines:
        rows = sorted((r for r in result["rows"] if r["engine"] == eng and "tok_s" in r), key=lambda r: r["context"])
        axes[0].plot([r["context"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=eng)
        axes[1].plot([r["context"] for r in rows], [r["ttft_s"] for r in rows], marker="o", label=eng)
        for r in (r for r in result["rows"] if r["engine"] == eng and "out_of_memory" in r):
            axes[0].axvline(r["context"], ls=":", color="gray", label=f"{eng}: out of memory at {r['context']}")
    axes[0].set(xlabel="context", ylabel="decode tok/s (batch 1)", xscale="log", yscale="log", title="decode")
    axes[1].set(xlabel="context", ylabel="TTFT s", xscale="log", yscale="log", title="time to first token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, f"DeepSeek-V4-Flash, first {result['meta']['settings']['layers']} layers, "
                                  f"dummy weights, on {result['meta']['device']}")
