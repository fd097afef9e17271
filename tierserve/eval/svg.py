"""SVG generation: a shipped prompt set -> the model's SVG -> safe parse -> sandboxed render -> metrics.

Per item: ``valid`` (well-formed, safe SVG), ``renderable`` (the renderer produced an image within the limits),
``lines``, ``bytes``, ``elements``, ``nonblank`` (share of the rendered canvas that is drawn on: opaque and
not near-white). A contact sheet PNG shows every render with its id.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from tierserve.eval.client import Advance, Generator, GenParams, _noop
from tierserve.eval.sandbox import run_isolated
from tierserve.eval.svg_safety import UnsafeSvg, check_svg

PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "eval" / "svg_prompts.json"
RENDER_CHILD = Path(__file__).with_name("_render_child.py")
SVG_OPEN = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 256 256" width="256" height="256">'
RENDER_PX = 256
_TAG = re.compile(r"<svg\b|</svg\s*>", re.IGNORECASE)


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> tuple[str, list[dict[str, str]]]:
    data = json.loads(Path(path or PROMPTS).read_text(encoding="utf-8"))
    prompts = data["prompts"][:limit] if limit is not None else data["prompts"]
    return data["instruction"], prompts


def prompt_text(instruction: str, subject: str, chat: bool) -> str:
    """Chat: the instruction alone. Completion: the instruction, then the opening tag for the model to continue."""
    text = instruction.format(subject=subject)
    return text + " Reply with the SVG code only." if chat else f"<!-- {text} -->\n{SVG_OPEN}\n"


def extract_svg(text: str) -> str | None:
    """The first complete ``<svg ...> ... </svg>`` in ``text`` (nested ``<svg>`` elements are balanced)."""
    depth, start = 0, None
    for m in _TAG.finditer(text):
        if m.group(0)[1] != "/":
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                return text[start:m.end()]
    return None


def renderer() -> str | None:
    for name in ("resvg_py", "cairosvg"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def render(svg: str, size: int = RENDER_PX, fit: str = "width", timeout: float = 10.0,
           memory_mb: int = 1024) -> tuple[bytes | None, str]:
    """PNG bytes (or None) and a reason, from a sandboxed renderer process."""
    r = run_isolated([sys.executable, "-I", str(RENDER_CHILD), str(size), fit], svg.encode("utf-8"),
                     timeout=timeout, memory_mb=memory_mb)
    if r.timed_out:
        return None, f"render timed out after {timeout:g} s"
    if r.returncode != 0 or not r.stdout.startswith(b"\x89PNG"):
        err = r.stderr.decode("utf-8", errors="replace").strip().splitlines()
        return None, f"render failed (exit {r.returncode}): {(err[-1] if err else '')[:160]}"
    return r.stdout, ""


def nonblank(png: bytes) -> float:
    """Share of pixels that are drawn: alpha > 16 and not near-white (a white background is blank)."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    inked = (px[..., 3] > 16) & (px[..., :3].min(axis=-1) < 240)
    return float(inked.mean()) if inked.size else 0.0


def score_svg(item_id: str, svg: str | None, timeout: float = 10.0, reason: str = "") -> tuple[dict, bytes | None]:
    """One row (and the PNG) for one SVG text; ``svg`` None means none was found in the model output."""
    row: dict[str, Any] = {"id": item_id, "valid": False, "renderable": False, "lines": 0, "bytes": 0,
                           "elements": 0, "nonblank": None, "reason": reason}
    if svg is None:
        row["reason"] = reason or "no <svg>...</svg> in the output"
        return row, None
    row["lines"], row["bytes"] = svg.count("\n") + 1, len(svg.encode("utf-8"))
    try:
        _, info = check_svg(svg)
    except UnsafeSvg as e:
        row["reason"] = f"unsafe: {e}"
        return row, None
    except ValueError as e:
        row["reason"] = f"invalid: {e}"
        return row, None
    row.update(valid=True, elements=info.elements, tags=dict(info.tags.most_common(8)),
               width=info.width, height=info.height)
    if renderer() is None:
        row["reason"] = "no renderer installed (pip install resvg-py)"
        return row, None
    fit = "height" if info.width and info.height and info.height > info.width else "width"
    png, why = render(svg, fit=fit, timeout=timeout)
    if png is None:
        row["reason"] = why
        return row, None
    row.update(renderable=True, nonblank=round(nonblank(png), 4), reason="")
    return row, png


def score_all(items: Sequence[tuple[str, str | None, str]], timeout: float = 10.0, workers: int = 4,
              advance: Advance = _noop) -> tuple[list[dict], list[bytes | None], dict[str, Any]]:
    """``items``: (id, svg text or None, reason). Returns rows, PNGs, summary."""
    def one(item):
        try:
            return score_svg(item[0], item[1], timeout, item[2])
        finally:
            advance(1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, items))
    rows = [r for r, _ in results]
    pngs = [p for _, p in results]
    return rows, pngs, summarize(rows)


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    n = len(rows)
    valid = [r for r in rows if r["valid"]]
    rend = [r for r in rows if r["renderable"]]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs) if rs else None
    return {"items": n, "valid_rate": len(valid) / n if n else None, "renderable_rate": len(rend) / n if n else None,
            "mean_lines": mean(valid, "lines"), "mean_bytes": mean(valid, "bytes"),
            "mean_elements": mean(valid, "elements"), "mean_nonblank": mean(rend, "nonblank"),
            "renderer": renderer()}


def read_dir(directory: str | Path) -> list[tuple[str, str | None, str]]:
    """``--svgs DIR``: every ``*.svg`` file, whole file as the SVG (not extracted)."""
    files = sorted(Path(directory).glob("*.svg"))
    if not files:
        raise ValueError(f"--svgs {directory}: no .svg files")
    items = []
    for f in files:
        size = f.stat().st_size
        if size > 4 * 1_000_000:      # do not even read absurd files into memory
            items.append((f.name, "", f"too large: {size:,} bytes"))
            continue
        items.append((f.name, f.read_bytes().decode("utf-8", errors="replace"), ""))
    return [(i, s if s else None, why) for i, s, why in items]


def generate(gen: Generator, prompts: Sequence[dict[str, str]], instruction: str, params: GenParams,
             chat: bool = False, advance: Advance = _noop) -> list[tuple[str, str | None, str]]:
    """Ask the model for each prompt; returns (id, extracted SVG or None, reason) and keeps the raw text."""
    params.stop = list(params.stop or ["</svg>"])
    texts = [prompt_text(instruction, p["subject"], chat) for p in prompts]
    outs = gen.complete(texts, params, chat=chat, advance=advance)
    items = []
    for p, cs in zip(prompts, outs):
        c = cs[0]
        if (c.finish_reason or "").startswith("error"):
            items.append((p["id"], None, c.finish_reason))
            continue
        full = c.text if chat else SVG_OPEN + "\n" + c.text
        if "</svg>" not in full.lower() and c.finish_reason == "stop":
            full += "</svg>"           # the stop string was cut off
        svg = extract_svg(full)
        items.append((p["id"], svg, "" if svg else f"no complete <svg> (finish: {c.finish_reason})"))
    return items


def contact_sheet(rows: Sequence[dict], pngs: Sequence[bytes | None], path: Path, thumb: int = 160,
                  cols: int = 8) -> Path:
    """A grid of the renders, each captioned with its id; invalid items as grey tiles with the reason."""
    from PIL import Image, ImageDraw

    n = max(1, len(rows))
    cols = min(cols, n)
    nrows = (n + cols - 1) // cols
    cap = 28
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, nrows * (thumb + cap + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, png) in enumerate(zip(rows, pngs)):
        x, y = 8 + (i % cols) * (thumb + 8), 8 + (i // cols) * (thumb + cap + 8)
        if png is not None:
            img = Image.open(io.BytesIO(png)).convert("RGBA")
            img.thumbnail((thumb, thumb))
            tile = Image.new("RGBA", (thumb, thumb), (255, 255, 255, 255))
            tile.alpha_composite(img, ((thumb - img.width) // 2, (thumb - img.height) // 2))
            sheet.paste(tile.convert("RGB"), (x, y))
        else:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(225, 225, 225))
            for k, line in enumerate(_wrap(row.get("reason") or "invalid", 24)[:6]):
                draw.text((x + 4, y + 4 + 12 * k), line, fill=(120, 0, 0))
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=(180, 180, 180))
        draw.text((x, y + thumb + 3), str(row["id"])[:26], fill=(0, 0, 0))
        mark = "ok" if row["renderable"] else ("valid" if row["valid"] else "x")
        draw.text((x, y + thumb + 15), mark, fill=(0, 128, 0) if row["renderable"] else (160, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    return [text[i:i + width] for i in range(0, len(text), width)]
