"""``PageList``: a request's page table (a list of page ids, see kv/manager.py) that knows when it changed.

Each engine step hands every scheduled request's table to the runner as an int64 array
(``runner/step_inputs.py``); converting a Python list of 8,193 ids (128k tokens) took ~0.3 ms a step on the CPU,
65,541 ids (1M tokens) ~1.6 ms, while a decode step changes a table once per page of new tokens (or when pages
spill / come back). ``array()`` converts once per change: every mutating list method drops the cached array.
"""
from __future__ import annotations

import numpy as np


def _mutator(name: str):
    base = getattr(list, name)

    def method(self, *args):
        self._arr = None
        return base(self, *args)
    method.__name__ = name
    return method


class PageList(list):
    __slots__ = ("_arr",)

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._arr: np.ndarray | None = None

    def array(self) -> np.ndarray:
        """The ids as a read-only int64 array (the same object until the list changes)."""
        if self._arr is None:
            arr = np.asarray(self, dtype=np.int64)
            arr.flags.writeable = False
            self._arr = arr
        return self._arr


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove",
              "clear", "sort", "reverse"):
    setattr(PageList, _name, _mutator(_name))
del _name
