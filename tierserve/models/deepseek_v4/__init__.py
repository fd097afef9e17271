"""DeepSeek-V4 (CSA / HCA compressed attention, lightning indexer, sinks, mHC, hash + top-k MoE).

See docs/deepseek_v4.md. Entry points: ``load_model`` (checkpoint -> ``DeepseekV4Model``),
``DeepseekV4Model.forward_full`` / ``prefill`` / ``forward_step``, ``greedy_generate``.
"""
from tierserve.models.deepseek_v4.config import DeepseekV4Config
from tierserve.models.deepseek_v4.model import DeepseekV4Model, greedy_generate
from tierserve.models.deepseek_v4.state import CompressorState, LayerState, SequenceState
from tierserve.models.deepseek_v4.weights import load_model

__all__ = [
           "CompressorState",
           "DeepseekV4Config",
           "DeepseekV4Model",
           "LayerState",
           "SequenceState",
           "greedy_generate",
           "load_model",
]
