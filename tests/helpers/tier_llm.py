"""The engine the KV-tier tests build: embedded nano, fp32 on the CPU, 16-token pages, page accounting checked
every step, lower-tier hits always loaded (so a test sees them whatever the cost policy would say)."""
from tierserve import LLM

PS = 16


def make_tier_llm(**kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_load_policy", "always")
    return LLM(None, dtype="float32", device="cpu", page_size=PS, debug_invariants=True, **kw)
