"""Low-precision recipes: NVFP4 / FP8 / AQT fake-quantized training, QAD and 4-bit packing for serving."""

from nemojax.quant.recipe import PRECISIONS, QuantDot, QuantOptions, apply_precision, rounding_key

__all__ = ["PRECISIONS", "QuantDot", "QuantOptions", "apply_precision", "rounding_key"]
