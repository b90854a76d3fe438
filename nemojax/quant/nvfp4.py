"""NVFP4 fake quantization and the NVFP4 training matmul (quant_training.md §1, TransformerEngine's reference
math, `NVFP4BlockScaling` defaults).

A tensor is stored as E2M1 values (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6) times an E4M3 scale per block of 16
elements along the GEMM's contraction axis times one FP32 scale per tensor:

    s_enc = 448 * 6 / amax(x)                      (1 when amax is 0)
    s_blk = e4m3(block_amax * s_enc / 6)           (round to nearest even, clamped to 448)
    q     = e2m1(clamp(x / (s_blk / s_enc), -6, 6)) (round to nearest even, or stochastic for gradients)
    x~    = q * s_blk / s_enc

The training matmul y = x @ w (x [T, K], w [K, N]) quantizes as the recipe does:
    fprop  Q_1x16(x) along K            @ Q_16x16(w)             (round to nearest even)
    dgrad  Q_1x16(dy) along N, SR       @ Q_16x16(w)^T           (the same w values as fprop)
    wgrad  Q_1x16(H x) along T          ^T @ Q_1x16(H dy) along T, SR on dy
where H is TE's 16-point random Hadamard transform applied along the token axis. H is orthogonal, so without
quantization (H x)^T (H dy) = x^T dy: the transform only spreads outliers before the 4-bit cast.
This is numerical simulation: the dots run in fp32 on the dequantized values (no FP4 tensor cores here).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16
# TE's fixed sign vector for the wgrad RHT (get_wgrad_sign_vector): one vector for every layer and step.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def _hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (a power of 2), entries +-1."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rht_matrix() -> jax.Array:
    """H = diag(signs) @ Hadamard16 / 4: [16, 16], orthogonal."""
    return jnp.asarray(np.diag(RHT_SIGNS) @ _hadamard(BLOCK) / np.sqrt(BLOCK), F32)


def e2m1_round(a: jax.Array, noise: Optional[jax.Array] = None) -> jax.Array:
    """Rounds magnitudes a in [0, 6] onto the E2M1 grid: to nearest with ties to even (TE's thresholds 0.25,
    0.75, 1.25, 1.75, 2.5, 3.5, 5 are exactly the midpoints), or stochastically with noise ~ U[0, 1):
    floor(a / step + u) * step, which rounds up with probability equal to the distance to the lower point."""
    step = jnp.where(a < 2.0, 0.5, jnp.where(a < 4.0, 1.0, 2.0))
    units = jnp.round(a / step) if noise is None else jnp.floor(a / step + noise)
    return jnp.minimum(units * step, E2M1_MAX)


def _to_blocks(x2: jax.Array, tile: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
    """[M, K] -> zero-padded [M'/ty, ty, K'/tx, tx] blocks (zeros change no amax and quantize to zero)."""
    ty, tx = tile
    m, k = x2.shape
    pm, pk = (-m) % ty, (-k) % tx
    if pm or pk:
        x2 = jnp.pad(x2, ((0, pm), (0, pk)))
    return x2.reshape((m + pm) // ty, ty, (k + pk) // tx, tx), (m, k)


def fake_quant(x: jax.Array, axis: int = -1, tile: tuple[int, int] = (1, BLOCK),
               key: Optional[jax.Array] = None) -> jax.Array:
    """Quantize-dequantize x to NVFP4 with blocks of `tile` = (rows, elements along `axis`); (1, 16) is the
    1-D scaling used for activations and gradients, (16, 16) the 2-D weight blocks. key: stochastic rounding
    (gradients only in the recipe). Returns fp32 with x's shape. Any length works: blocks are zero-padded."""
    moved = jnp.moveaxis(x.astype(F32), axis, -1)
    shape = moved.shape
    blocks, (m, k) = _to_blocks(moved.reshape(-1, shape[-1]), tile)
    amax = jnp.max(jnp.abs(blocks))
    s_enc = jnp.where(amax > 0, jnp.minimum(E4M3_MAX * E2M1_MAX / amax, jnp.finfo(F32).max), 1.0)
    s_dec = 1.0 / s_enc
    block_amax = jnp.max(jnp.abs(blocks), axis=(1, 3), keepdims=True)
    s_blk = jnp.clip(block_amax * (s_enc / E2M1_MAX), -E4M3_MAX, E4M3_MAX)
    s_blk = s_blk.astype(jnp.float8_e4m3fn).astype(F32)
    enc = jnp.minimum(1.0 / (s_blk * s_dec), jnp.finfo(F32).max)     # an all-zero block gets enc = FLT_MAX, q = 0
    v = jnp.clip(blocks * enc, -E2M1_MAX, E2M1_MAX)
    noise = None if key is None else jax.random.uniform(key, v.shape, F32)
    q = jnp.sign(v) * e2m1_round(jnp.abs(v), noise)
    out = (q * s_blk * s_dec).reshape(blocks.shape[0] * blocks.shape[1], -1)[:m, :k]
    return jnp.moveaxis(out.reshape(shape), -1, axis)


def rht(x: jax.Array, axis: int = 0) -> jax.Array:
    """Blockwise 16-point random Hadamard transform along `axis` (zero-padded to a multiple of 16; the padded
    length is kept so that rht(x)^T rht(y) = x^T y holds exactly)."""
    moved = jnp.moveaxis(x, axis, -1)
    pad = (-moved.shape[-1]) % BLOCK
    if pad:
        moved = jnp.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    shape = moved.shape
    out = (moved.reshape(-1, BLOCK).astype(F32) @ rht_matrix()).reshape(shape)
    return jnp.moveaxis(out, -1, axis)


@dataclasses.dataclass(frozen=True)
class NVFP4Recipe:
    """Switches of the training recipe (all on = TE's NVFP4BlockScaling defaults)."""

    weight_2d: bool = True              # 16x16 weight blocks: fprop and dgrad see identical weights
    rht: bool = True                    # Hadamard transform on the wgrad operands
    stochastic_rounding: bool = True    # SR on dy (dgrad and wgrad copies)
    quantize_fprop: bool = True         # False after the switch back to high precision for the forward


def quantize_weight(w: jax.Array, recipe: NVFP4Recipe, along: int = 0) -> jax.Array:
    """w [K, N] as the GEMM sees it: 16x16 blocks (identical for fprop and dgrad), or 1x16 along axis `along`
    (0 = K for fprop, 1 = N for dgrad's transposed copy)."""
    if recipe.weight_2d:
        return fake_quant(w, axis=0, tile=(BLOCK, BLOCK))
    return fake_quant(w, axis=along)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def nvfp4_matmul(x: jax.Array, w: jax.Array, key: jax.Array, recipe: NVFP4Recipe = NVFP4Recipe()) -> jax.Array:
    """x [T, K] @ w [K, N] -> fp32 [T, N] with the NVFP4 recipe in fprop, dgrad and wgrad (module docstring).
    key seeds the stochastic rounding of the gradients."""
    if not recipe.quantize_fprop:
        return _dot(x.astype(F32), w.astype(F32))
    return _dot(fake_quant(x, axis=-1), quantize_weight(w, recipe, along=0))


def _fwd(x, w, key, recipe):
    return nvfp4_matmul(x, w, key, recipe), (x, w, key)


def _bwd(recipe, res, dy):
    x, w, key = res
    k_dgrad, k_wgrad = jax.random.split(key)
    sr = recipe.stochastic_rounding
    dy = dy.astype(F32)
    dx = _dot(fake_quant(dy, axis=-1, key=k_dgrad if sr else None), quantize_weight(w, recipe, along=1).T)
    xt, dyt = (rht(x, 0), rht(dy, 0)) if recipe.rht else (x, dy)
    dw = _dot(fake_quant(xt, axis=0).T, fake_quant(dyt, axis=0, key=k_wgrad if sr else None))
    return dx.astype(x.dtype), dw.astype(w.dtype), None


nvfp4_matmul.defvjp(_fwd, _bwd)


def ste_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """W4A4 fake quantization of the forward only (ModelOpt's NVFP4_DEFAULT_CFG: 1x16 blocks along K for both
    operands) with straight-through gradients: dx = dy @ w~^T, dw = x~^T @ dy. The student of QAD and PTQ."""
    xq = x + jax.lax.stop_gradient(fake_quant(x, axis=-1).astype(x.dtype) - x)
    wq = w + jax.lax.stop_gradient(fake_quant(w, axis=0).astype(w.dtype) - w)
    return _dot(xq.astype(F32), wq.astype(F32))
