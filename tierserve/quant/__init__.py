"""Quantisation: block-scaled FP8 weights (``fp8``, ``fp8_linear``) and the Triton FP8 decode GEMV
(``triton_fp8_gemv``, imported lazily: it needs Triton). See docs/fp8.md."""
from tierserve.quant.fp8 import (
                                 DEFAULT_BLOCK,
                                 FP8_DTYPE,
                                 FP8_MAX,
                                 Fp8Format,
                                 dequantize_fp8_blockwise,
                                 fp8_format_from_hf,
                                 fp8_linear_ref,
                                 quantize_act_fp8,
                                 quantize_fp8_blockwise,
)
from tierserve.quant.fp8_linear import (
                                 Fp8Linear,
                                 fp8_row_block,
                                 load_fp8_weight,
                                 pair_fp8_weights,
                                 quantize_linear,
                                 quantize_model_fp8,
)

__all__ = ["DEFAULT_BLOCK", "FP8_DTYPE", "FP8_MAX", "Fp8Format", "Fp8Linear", "dequantize_fp8_blockwise",
           "fp8_format_from_hf", "fp8_linear_ref", "fp8_row_block", "load_fp8_weight", "pair_fp8_weights",
           "quantize_act_fp8", "quantize_fp8_blockwise", "quantize_linear", "quantize_model_fp8"]
