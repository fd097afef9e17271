"""Disk-backed slots for live pages that fit neither in the GPU pool nor in CPU RAM.

A sparse file under the disk-tier directory, memory-mapped as a tensor ``[slots, *page_shape]``; the OS
page cache holds what is hot. Pages here are read back by attention every step, so this is the
slowest place a live page can be -- it lets a sequence run that fits nowhere else.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch


class DiskSpill:
    name = "disk-spill"

    def __init__(self, directory: str | os.PathLike, page_shape: tuple[int, ...], dtype: torch.dtype,
                 num_pages: int) -> None:
        self.path = Path(directory) / f".spill-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
        elem = torch.empty((), dtype=dtype).element_size()
        page_bytes = int(np.prod(page_shape)) * elem
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(num_pages * page_bytes,))
        self.data = torch.from_numpy(self._mm).view(dtype).view(num_pages, *page_shape)
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    def reserve(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def close(self) -> None:
        try:
            del self.data, self._mm
            self.path.unlink()
        except (OSError, AttributeError):
            pass

    def __del__(self) -> None:
        self.close()
