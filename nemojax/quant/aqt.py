"""AQT (`aqtp`) int8 / int4 quantized training (quant_training.md §5).

AQT's DotGeneral quantizes the forward GEMM and both backward GEMMs (dgrad: dy . w^T, wgrad: x^T . dy) with
symmetric integer numerics and abs-max calibration per output row/column; stochastic rounding (uniform noise
before rounding) is applied to the gradient operand only (config_v4). Bits are per GEMM: (fwd, dgrad, wgrad),
None = that GEMM stays in high precision.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

PRESETS = {"aqt_int8": (8, 8, 8), "aqt_int4": (4, 8, 8)}


@functools.lru_cache(maxsize=None)
def aqt_config(fwd_bits: Optional[int], dgrad_bits: Optional[int], wgrad_bits: Optional[int]):
    """The AQT DotGeneral config (built once per bit choice; copies get the per-call rounding key)."""
    from aqt.jax.v2 import config as aqt_cfg

    return aqt_cfg.config_v4(fwd_bits=fwd_bits, dlhs_bits=dgrad_bits, drhs_bits=wgrad_bits, rng_type="jax.uniform")


def aqt_matmul(x: jax.Array, w: jax.Array, key: jax.Array, bits: tuple) -> jax.Array:
    """x [T, K] @ w [K, N] through AQT with `bits` = (fwd, dgrad, wgrad); key seeds the gradients' SR noise."""
    from aqt.jax.v2 import config as aqt_cfg

    dot = aqt_cfg.set_context(aqt_config(*bits), key=key, train_step=None)
    return dot(x, w, (((1,), (0,)), ((), ())))
