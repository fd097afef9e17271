"""Static memory held outside the GPU: Engram hashed n-gram tables (see docs/engram.md)."""
from tierserve.memory.engram import (
    CausalConv,
    Engram,
    EngramStep,
    engram_modules,
    prepare_engram_step,
)
from tierserve.memory.engram_canonical import CanonicalIds, build_canonical_ids, normalise_text
from tierserve.memory.engram_config import EngramConfig
from tierserve.memory.engram_hash import NgramHasher, engram_history, ngram_row_ids, table_sizes
from tierserve.memory.engram_table import EngramTable, PrefetchHandle

__all__ = ["CanonicalIds", "CausalConv", "Engram", "EngramConfig", "EngramStep", "EngramTable", "NgramHasher",
           "PrefetchHandle", "build_canonical_ids", "engram_history", "engram_modules", "ngram_row_ids",
           "normalise_text", "prepare_engram_step", "table_sizes"]
