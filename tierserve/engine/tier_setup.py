"""The KV tiers behind the GPU pool, from the engine's settings (``--cpu-kv-gb``, ``--disk-kv-dir``,
``--remote-kv-url``; docs/tiers.md): page shape and bytes per tier page (compact FP8 rows with
``--kv-dtype fp8``), the model/layout fingerprint that guards stored blocks, and the disk spill file's size."""
from __future__ import annotations

import torch

from tierserve.config import EngineConfig
from tierserve.kv.tiers.fingerprint import kv_fingerprint
from tierserve.kv.tiers.manager import TierManager


def make_tiers(config: EngineConfig, runner, model_path, max_model_len: int) -> TierManager | None:
    """None when no tier is configured."""
    if not (config.cpu_kv_gb or config.disk_kv_dir or config.remote_kv_url):
        return None
    layout = runner.layout
    page_shape, dtype, page_bytes = tuple(runner.kv.data.shape[1:]), layout.dtype, layout.bytes_per_page
    if config.kv_dtype == "fp8":     # spilled live pages in CPU RAM as compact FP8 rows (about half a page)
        fp8_row = runner.fp8.row_bytes(runner.kv.data)
        page_shape, dtype = (layout.num_layers, 2, fp8_row), torch.uint8
        page_bytes = layout.num_layers * 2 * fp8_row
    host_pages = int(config.cpu_kv_gb * 2**30 // page_bytes) if config.cpu_kv_gb else 0
    fp = kv_fingerprint(model_path, layout, f"{config.load_format}:{config.seed}")
    # a sparse file for live pages beyond GPU and CPU RAM: up to a quarter of the disk budget, at
    # most what every running sequence at full length could need
    spill_pages = 0
    if config.disk_kv_dir:
        need = -(-config.max_num_seqs * max_model_len // config.page_size)
        spill_pages = int(min(need, config.disk_kv_gb * 2**30 // 4 // layout.bytes_per_page))
    return TierManager(page_shape, dtype, fp,
                       host_pages=host_pages, disk_dir=config.disk_kv_dir,
                       disk_bytes=int(config.disk_kv_gb * 2**30), remote_url=config.remote_kv_url,
                       policy=config.kv_load_policy, spill_pages=spill_pages,
                       prefetch=config.kv_prefetch is not False, device=runner.kv.data.device)
