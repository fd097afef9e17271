"""EngramConfig: which layers carry Engram memory, the n-gram orders, heads, table sizes and placement.

Validated in ``__post_init__``; every error names the field and the allowed range. ``to_dict``/``from_dict``
give the ``"engram"`` entry of a checkpoint's config.json. The hashing parameters that a checkpoint is
trained with (``seed``, ``orders``, ``heads_per_order``, ``table_size``, ``canonical_vocab_size``, ``pad_id``,
``layers``) must be kept with it: change one and every row id changes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

PLACEMENTS = ("device", "cpu", "disk")
HOST_GATHERS = ("auto", "copy", "zero_copy")
FP8_BLOCK = 32            # values per power-of-two scale in FP8 rows
MAX_ORDER = 8


@dataclass
class EngramConfig:
    layers: tuple[int, ...] = (1,)          # decoder layers that carry an Engram module
    orders: tuple[int, ...] = (2, 3)        # n-gram orders (2 = bigram of the previous and current token)
    heads_per_order: int = 8                # hash heads per order, each with its own prime-sized table
    dim_per_head: int = 64                  # embedding width of one head's rows
    table_size: int | tuple[int, ...] = 1 << 16   # requested rows per head (per order when a tuple); the
    #                                         actual size is the next unused prime >= this
    conv_kernel_size: int = 0               # short depthwise causal conv over the gated values; 0 = off
    conv_dilation: int | None = None        # None: max(orders) as in the paper
    hc_mult: int = 1                        # hyper-connection streams (mHC): one gate per stream
    placement: str = "device"               # device | cpu (pinned host RAM) | disk (memory-mapped file)
    disk_path: str | None = None            # directory for the memory-mapped tables (placement="disk")
    host_gather: str = "auto"               # copy: host gather + side-stream copy; zero_copy: Triton kernel
    #                                         reading pinned RAM (in CUDA graphs); auto: zero_copy on CUDA
    fp8_rows: bool = False                  # rows stored as e4m3 with one power-of-two scale per 32 values
    seed: int = 0                           # hash multipliers are drawn from seed + 10007 * layer
    canonical_vocab_size: int | None = None  # number of canonical token ids; None = take it from the table
    pad_id: int | None = None               # canonical id before the sequence start; None = canonical_vocab_size

    def __post_init__(self) -> None:
        self.layers = _int_tuple("layers", self.layers, 0, 1 << 16)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"engram.layers must be a non-empty list of distinct layer indices, got {self.layers}")
        self.orders = _int_tuple("orders", self.orders, 2, MAX_ORDER)
        if not self.orders or list(self.orders) != sorted(set(self.orders)):
            raise ValueError(f"engram.orders must be distinct and ascending, each in [2, {MAX_ORDER}], "
                             f"got {self.orders}")
        _int_range("heads_per_order", self.heads_per_order, 1, 1024)
        _int_range("dim_per_head", self.dim_per_head, 1, 1 << 14)
        if isinstance(self.table_size, (list, tuple)):
            self.table_size = _int_tuple("table_size", self.table_size, 2, 1 << 40)
            if len(self.table_size) != len(self.orders):
                raise ValueError(f"engram.table_size must be one int or one per order ({len(self.orders)}), "
                                 f"got {len(self.table_size)} values")
        else:
            _int_range("table_size", self.table_size, 2, 1 << 40)
        _int_range("conv_kernel_size", self.conv_kernel_size, 0, 16)
        if self.conv_kernel_size == 1:
            raise ValueError("engram.conv_kernel_size must be 0 (off) or in [2, 16], got 1")
        if self.conv_dilation is not None:
            _int_range("conv_dilation", self.conv_dilation, 1, 64)
        _int_range("hc_mult", self.hc_mult, 1, 64)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("host_gather", self.host_gather, HOST_GATHERS)
        if self.disk_path is not None and not isinstance(self.disk_path, (str, os.PathLike)):
            raise ValueError(f"engram.disk_path must be a directory path, got {self.disk_path!r}")
        if not isinstance(self.fp8_rows, bool):
            raise ValueError(f"engram.fp8_rows must be true or false, got {self.fp8_rows!r}")  # noqa: TRY004
        if self.fp8_rows and self.dim_per_head % FP8_BLOCK:
            raise ValueError(f"engram.dim_per_head must be a multiple of {FP8_BLOCK} with fp8_rows, "
                             f"got {self.dim_per_head}")
        _int_range("seed", self.seed, 0, (1 << 63) - 1)
        if self.canonical_vocab_size is not None:
            _int_range("canonical_vocab_size", self.canonical_vocab_size, 1, 1 << 32)
        if self.pad_id is not None:
            hi = self.canonical_vocab_size if self.canonical_vocab_size is not None else 1 << 32
            _int_range("pad_id", self.pad_id, 0, hi)

    # ---- derived sizes -----------------------------------------------------------------------------------
    @property
    def max_order(self) -> int:
        return self.orders[-1]

    @property
    def lookback(self) -> int:
        """Tokens before a chunk that its n-grams read (max_order - 1)."""
        return self.max_order - 1

    @property
    def num_heads(self) -> int:
        """Tables per layer: len(orders) * heads_per_order (order-major)."""
        return len(self.orders) * self.heads_per_order

    @property
    def engram_dim(self) -> int:
        """Width of the concatenated gathered rows of one token."""
        return self.num_heads * self.dim_per_head

    @property
    def dilation(self) -> int:
        return self.conv_dilation if self.conv_dilation is not None else self.max_order

    @property
    def conv_history(self) -> int:
        """Conv inputs of earlier positions a chunk needs: (kernel - 1) * dilation, 0 without conv."""
        return (self.conv_kernel_size - 1) * self.dilation if self.conv_kernel_size else 0

    def requested_sizes(self) -> tuple[int, ...]:
        ts = self.table_size
        return tuple(ts) if isinstance(ts, tuple) else (int(ts),) * len(self.orders)

    def check_model(self, num_layers: int) -> None:
        """Raise if a layer index does not exist in a model of ``num_layers`` layers."""
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"engram.layers {bad} out of range: the model has {num_layers} layers "
                             f"(allowed 0..{num_layers - 1})")

    # ---- config.json ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngramConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown engram setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _int_range(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"engram.{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _int_tuple(name: str, value: Any, lo: int, hi: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"engram.{name} must be a list of integers in [{lo}, {hi}], got {value!r}")  # noqa: TRY004
    for v in value:
        _int_range(name, v, lo, hi)
    return tuple(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"engram.{name} must be one of {', '.join(allowed)}, got {value!r}")
