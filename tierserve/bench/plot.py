"""Plots for benchmark result files (matplotlib, imported lazily)."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path, title: str) -> Path:
    """The common end of every benchmark plot: suptitle, tight layout, PNG at 110 dpi, figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decode(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tok_s" in r]      # skipped cases have no numbers
    engines = sorted({r["engine"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for eng in engines:
        for ctx in contexts:
            pts = sorted((r["batch"], r["tok_s"]) for r in rows if r["engine"] == eng and r["context"] == ctx)
            axes[0].plot(*zip(*pts), marker="o", label=f"{eng}, ctx {ctx}")
        for b in batches:
            pts = sorted((r["context"], r["tok_s"]) for r in rows if r["engine"] == eng and r["batch"] == b)
            axes[1].plot(*zip(*pts), marker="o", label=f"{eng}, batch {b}")
    axes[0].set(xlabel="batch", ylabel="decode tok/s", xscale="log", yscale="log", title="tok/s vs batch")
    axes[1].set(xlabel="context", ylabel="decode tok/s", xscale="log", yscale="log", title="tok/s vs context")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    meta = result["meta"]
    return save_figure(fig, path, f"decode: {Path(meta['settings']['model']).name} on {meta['device']}")
