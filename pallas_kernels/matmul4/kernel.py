"""x[M, K] @ W4[K, N] with W4 in 4 bits (formats.py), dequantized inside a Pallas kernel, fp32 accumulation.

Grid (M / bm, N / bn, K'/2 / bk) with the K axis last and sequential: each step loads one packed tile
[bk, bn] (rows k and k + K'/2 of the weight in its two nibbles), the matching two x tiles and scale rows,
decodes both nibble planes to the compute dtype, and accumulates two matmuls into the resident fp32 output
tile. Tiles never straddle a scale block (bk is a multiple of the block size).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.matmul4.formats import Packed4, e2m1_decode, int4_decode

F32 = jnp.float32


def _decode(codes, scales, block: int, fmt: str, tensor_scale):
    """codes uint8 [bk, bn] (one nibble plane), scales [bk / block, bn] -> fp32 [bk, bn]."""
    values = e2m1_decode(codes) if fmt == "nvfp4" else int4_decode(codes)
    bk, bn = values.shape
    scaled = values.reshape(bk // block, block, bn) * scales.astype(F32)[:, None, :]
    return scaled.reshape(bk, bn) * tensor_scale


def _kernel(ts_ref, x_lo_ref, x_hi_ref, w_ref, s_lo_ref, s_hi_ref, o_ref, *, fmt, block, compute_dtype):
    @pl.when(pl.program_id(2) == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    packed = w_ref[...]
    ts = ts_ref[0]
    w_lo = _decode(packed & 15, s_lo_ref[...], block, fmt, ts).astype(compute_dtype)
    w_hi = _decode(packed >> 4, s_hi_ref[...], block, fmt, ts).astype(compute_dtype)
    acc = jnp.dot(x_lo_ref[...].astype(compute_dtype), w_lo, preferred_element_type=F32)
    acc += jnp.dot(x_hi_ref[...].astype(compute_dtype), w_hi, preferred_element_type=F32)
    o_ref[...] += acc


def _tile(size: int, candidates, multiple: int = 1) -> int:
    """The largest candidate dividing size (and a multiple of `multiple`), else the whole dimension."""
    for c in candidates:
        if c <= size and size % c == 0 and c % multiple == 0:
            return c
    return size


def matmul4(x, w: Packed4, *, compute_dtype=jnp.bfloat16, interpret: bool | None = None,
            block_m: int = 128, block_n: int = 256, block_k: int = 512):
    """x [M, K] @ w -> fp32 [M, N]. compute_dtype: dtype the decoded tile and x meet in (bf16 on accelerators;
    fp32 reproduces the reference exactly). interpret defaults to True off TPU/GPU."""
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [M, {w.k}] for a 4-bit weight of shape {w.shape}, got {x.shape}")
    if interpret is None:
        interpret = jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")
    m = x.shape[0]
    half, n = w.data.shape
    bm = min(block_m, -(-m // 8) * 8)                       # M padded to a multiple of 8 (one sublane tile)
    m_pad = -(-m // bm) * bm
    bn = _tile(n, (block_n, 256, 128))
    bk = _tile(half, (block_k, 512, 256, 128, 64, 32, 16), multiple=w.block)
    if bk % w.block:
        raise ValueError(f"K/2 = {half} has no tile that is a multiple of the scale block {w.block}")
    x_pad = jnp.pad(x, ((0, m_pad - m), (0, 2 * half - w.k)))
    nk = half // bk
    sb = bk // w.block
    kernel = functools.partial(_kernel, fmt=w.fmt, block=w.block, compute_dtype=compute_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), F32),
        grid=(m_pad // bm, n // bn, nk),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, k: (0,)),            # the fp32 tensor scale
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k + nk)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((sb, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((sb, bn), lambda i, j, k: (k + nk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        interpret=interpret,
    )(w.tensor_scale.reshape(1).astype(F32), x_pad, x_pad, w.data, w.scales, w.scales)
    return out[:m]
