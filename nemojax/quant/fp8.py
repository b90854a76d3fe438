"""FP8 training matmul with per-tensor current scaling (quant_training.md §2; TE `Float8CurrentScaling`).

Each GEMM operand is scaled by dtype_max / amax of the tensor as it is now (no amax history), cast to FP8 with
round-to-nearest-even and scaled back. Nemotron-H's paper uses E4M3 for every tensor including gradients;
`grad_dtype="e5m2"` gives the E4M3/E5M2 "hybrid" format instead. Per-tensor scales make a tensor's quantized
copy the same in both orientations, so fprop, dgrad and wgrad reuse one quantization of x, w and dy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def fake_quant(x: jax.Array, fmt: str = "e4m3") -> jax.Array:
    """Quantize-dequantize x with one current scale for the whole tensor -> fp32, same shape."""
    dtype = FP8_DTYPES[fmt]
    fmax = float(jnp.finfo(dtype).max)
    x = x.astype(F32)
    amax = jnp.max(jnp.abs(x))
    scale = jnp.where(amax > 0, fmax / amax, 1.0)
    # the clip guards the cast: fp32 rounding of x * scale can land a hair above fmax, which E4M3 turns into NaN
    return jnp.clip(x * scale, -fmax, fmax).astype(dtype).astype(F32) / scale


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x: jax.Array, w: jax.Array, grad_fmt: str = "e4m3", quantize_fprop: bool = True) -> jax.Array:
    """x [T, K] @ w [K, N] -> fp32 [T, N]; x and w in E4M3, dy in `grad_fmt` for dgrad and wgrad.
    quantize_fprop=False runs the forward in high precision (the late switch back) and keeps FP8 gradients."""
    if not quantize_fprop:
        return _dot(x.astype(F32), w.astype(F32))
    return _dot(fake_quant(x), fake_quant(w))


def _fwd(x, w, grad_fmt, quantize_fprop):
    return fp8_matmul(x, w, grad_fmt, quantize_fprop), (x, w)   # quantized copies are recomputed, not stored


def _bwd(grad_fmt, quantize_fprop, res, dy):
    x, w = res
    dyq = fake_quant(dy, grad_fmt)
    return _dot(dyq, fake_quant(w).T).astype(x.dtype), _dot(fake_quant(x).T, dyq).astype(w.dtype)


fp8_matmul.defvjp(_fwd, _bwd)
