"""x[M, K] @ W4[K, N] with W4 in 4 bits (formats.py), dequantized inside a Pallas kernel, fp32 accumulation.

Grid (M / bm, N / bn, K'/2 / bk) with the K axis last and sequential: each step loads one packed tile
[bk, bn] (rows k and k + K'/2 of the weight in its two nibbles), the matching x columns and scale rows of both
planes, decodes each nibble plane to the compute dtype, and accumulates two matmuls into the resident fp32
output tile. Tiles never straddle a scale block (bk is a multiple of the block size). The fp32 tensor scale multiplies
the output after the kernel.

Decoding uses int32 arithmetic only (Mosaic TPU cannot shift 8-bit vectors, and not every TPU converts FP8):
nibbles are `(byte & 15)` and `(byte >> 4)` of the widened byte, E4M3 scales are rebuilt from their bits.

Targets (tiles follow each compiler's block rules):
    tpu  Mosaic TPU: the last two block dims are multiples of (8, 128) or the whole array dim. x and the
         scales are viewed as [M, 2, K'/2] and [2, K'/(2 block), N] (free reshapes), so bk is a multiple of
         8 * block (scale tiles of >= 8 rows) and bn 256; the grid covers K'/2 and N in whole tiles, the last
         ones reaching past the arrays: rows past K'/2 are zeroed in the kernel, columns past N are not
         written.
    gpu  Triton (num_warps 4, 2 stages): every block dim a power of two, at least 16 for the matmul operands,
         dividing its array dim (N is padded when no power of two from 16 divides it).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.matmul4.formats import Packed4, e2m1_decode, int4_decode

F32 = jnp.float32
TARGETS = ("tpu", "gpu")


def decode_e4m3(bits):
    """E4M3 bit patterns (int32 holding a byte) -> fp32: 2^(e-7) (1 + m/8), subnormals 2^-6 m/8."""
    e, m = (bits >> 3) & 15, bits & 7
    normal = jax.lax.bitcast_convert_type(((e + 120) << 23) | (m << 20), F32)
    value = jnp.where(e == 0, m.astype(F32) * (2.0 ** -9), normal)
    return jnp.where((bits & 128) != 0, -value, value)


def _decode(codes, scales, block: int, fmt: str):
    """codes int32 [bk, bn] (one nibble plane), scales [bk / block, bn] (E4M3 bits as int32, or bf16) -> fp32."""
    values = e2m1_decode(codes) if fmt == "nvfp4" else int4_decode(codes)
    scales = decode_e4m3(scales) if fmt == "nvfp4" else scales.astype(F32)
    bk, bn = values.shape
    return (values.reshape(bk // block, block, bn) * scales[:, None, :]).reshape(bk, bn)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, fmt, block, compute_dtype, half):
    """x_ref [bm, 2, bk] (the columns of both nibble planes), w_ref [bk, bn], s_ref [2, bk / block, bn]. When
    bk does not divide K'/2 the last K tile reaches past w and its scales: those rows (unspecified values) are
    zeroed; x is zero-padded to whole tiles."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    bk = w_ref.shape[0]
    packed = w_ref[...].astype(jnp.int32)
    acc = jnp.zeros(o_ref.shape, F32)
    for plane, codes in enumerate((packed & 15, packed >> 4)):
        scales = s_ref[plane]
        scales = scales.astype(jnp.int32) if fmt == "nvfp4" else scales
        w = _decode(codes, scales, block, fmt)
        if half % bk:
            w = jnp.where(k * bk + jax.lax.broadcasted_iota(jnp.int32, w.shape, 0) < half, w, 0.0)
        acc += jnp.dot(x_ref[:, plane, :].astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=F32)
    o_ref[...] += acc


def _largest(size: int, candidates, multiple: int = 1) -> Optional[int]:
    return next((c for c in candidates if c <= size and size % c == 0 and c % multiple == 0), None)


def tiles(m: int, half: int, n: int, block: int, target: str, block_m: int = 128, block_n: int = 256,
          block_k: int = 512) -> tuple[int, int, int, int]:
    """(bm, bn, bk, n_padded) for M rows, K'/2 packed rows, N columns and scale blocks of `block` rows."""
    if target == "tpu":
        bm = min(block_m, -(-m // 8) * 8)
        bn = n if n <= block_n else block_n                       # a partial last N tile is fine (see above)
        step = 8 * block                                          # scale tiles of >= 8 rows; a multiple of 128
        bk = min(max(block_k // step, 1) * step, -(-half // step) * step)
        return bm, bn, (half if bk >= half else bk), n
    bm = min(block_m, max(16, 1 << (m - 1).bit_length()))
    powers = (block_n, 256, 128, 64, 32, 16)
    n_pad = n if _largest(n, powers) else -(-n // 16) * 16
    bk = _largest(half, (block_k, 512, 256, 128, 64, 32, 16), block)
    return bm, _largest(n_pad, powers), bk, n_pad


def cost(m: int, k: int, n: int, w: Packed4, x_itemsize: int) -> pl.CostEstimate:
    """Two matmul FLOPs per multiply-add; bytes: the packed weight and scales once, x and the fp32 output."""
    return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=int(w.nbytes + m * k * x_itemsize + 4 * m * n))


def matmul4(x, w: Packed4, *, compute_dtype=jnp.bfloat16, target: Optional[str] = None,
            interpret: Optional[bool] = None, block_m: int = 128, block_n: int = 256, block_k: int = 512):
    """x [M, K] @ w -> fp32 [M, N]. compute_dtype: dtype the decoded tile and x meet in (bf16 on accelerators;
    fp32 reproduces the reference). target 'tpu' or 'gpu' picks the tiles and compiler (default: the backend;
    other backends run the TPU kernel in interpret mode); interpret defaults to True off TPU/GPU."""
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [M, {w.k}] for a 4-bit weight of shape {w.shape}, got {x.shape}")
    backend = jax.default_backend()
    on_accelerator = backend in ("tpu", "gpu", "cuda", "rocm")
    target = target or ("gpu" if backend in ("gpu", "cuda", "rocm") else "tpu")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    interpret = not on_accelerator if interpret is None else interpret
    m = x.shape[0]
    half, n = w.data.shape
    bm, bn, bk, n_pad = tiles(m, half, n, w.block, target, block_m, block_n, block_k)
    m_pad = -(-m // bm) * bm
    x_pad = jnp.pad(x, ((0, m_pad - m), (0, 2 * half - w.k)))
    data, scales = w.data, w.scales
    if scales.dtype == jnp.float8_e4m3fn:
        scales = jax.lax.bitcast_convert_type(scales, jnp.uint8)
    if n_pad != n:
        data, scales = (jnp.pad(a, ((0, 0), (0, n_pad - n))) for a in (data, scales))
    nk, sb = -(-half // bk), bk // w.block
    # free views: the two nibble planes' columns of x, and their scale rows, each get an axis of their own
    x3 = jnp.pad(x_pad.reshape(m_pad, 2, half), ((0, 0), (0, 0), (0, nk * bk - half)))
    scales3 = scales.reshape(2, half // w.block, n_pad)
    params = None
    if target == "gpu" and not interpret:
        params = plt.CompilerParams(num_warps=4, num_stages=2)
    elif target == "tpu" and not interpret:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    out = pl.pallas_call(
        functools.partial(_kernel, fmt=w.fmt, block=w.block, compute_dtype=compute_dtype, half=half),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), F32),
        grid=(m_pad // bm, -(-n_pad // bn), nk),
        in_specs=[
            pl.BlockSpec((bm, 2, bk), lambda i, j, k: (i, 0, k)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((2, sb, bn), lambda i, j, k: (0, k, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        compiler_params=params,
        cost_estimate=cost(m, w.k, n, w, x.dtype.itemsize),
        interpret=interpret,
    )(x3, data, scales3)
    return out[:m, :n] * w.tensor_scale
