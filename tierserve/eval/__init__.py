"""``tierserve eval``: perplexity, passkey retrieval, HumanEval and SVG generation, in-process or against any
OpenAI-compatible endpoint. See docs/eval.md."""
