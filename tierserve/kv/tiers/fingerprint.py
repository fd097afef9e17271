"""Fingerprint of KV contents: blocks stored by another model, dtype or page layout are refused."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tierserve.kv.layout import KVLayout


def kv_fingerprint(model_path, layout: KVLayout, weights_tag: str = "") -> str:
    """Identifies KV contents: model config, dtype and page layout (blocks from elsewhere are refused)."""
    h = hashlib.blake2b(digest_size=16)
    cfg = Path(model_path) / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else str(model_path).encode())
    h.update(weights_tag.encode())
    for p in sorted(Path(model_path).glob("*.safetensors")):      # size + head + tail of each shard
        with open(p, "rb") as f:
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    h.update(repr((str(layout.dtype), layout.num_layers, layout.num_kv_heads, layout.head_dim,
                   layout.page_size, layout.rows_per_page, "tierserve-kv-v1")).encode())
    return h.hexdigest()
