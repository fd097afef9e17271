"""tierserve: an LLM inference engine with tiered KV memory, sparse FP8 decoding and an eval suite."""
from tierserve.config import EngineConfig
from tierserve.engine.outputs import CompletionOutput, RequestOutput
from tierserve.llm import LLM
from tierserve.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "__version__"]
