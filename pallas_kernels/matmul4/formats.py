"""4-bit weight formats, pack/unpack helpers and the pure-JAX reference matmul.

Two values per byte, split by halves of K so a kernel never interleaves rows: byte [k, n] holds row k in its
low nibble and row k + K'/2 in its high nibble (K' = K padded to a multiple of 2 * block with zero rows).

    nvfp4  E2M1 codes (sign bit 3; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), an E4M3 scale per 16 rows along K
           and an fp32 tensor scale: w = e2m1 * scale_e4m3 * tensor_scale (TensorEngine's two-level scaling:
           tensor_scale = amax / (6 * 448), block scale = block_amax / 6 / tensor_scale rounded to E4M3).
    int4   symmetric codes -7..7 (two's complement nibbles) with a bf16 scale per `group` rows (32/64/128):
           w = code * scale, scale = group_amax / 7.
Quantization here rounds to nearest (ties to even for E2M1 via jnp.round on the grid); the training-side
NVFP4 recipe (stochastic rounding, RHT, 2-D blocks) lives with the low-precision recipes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FORMATS = ("nvfp4", "int4")
NVFP4_BLOCK = 16
INT4_GROUPS = (32, 64, 128)
E4M3_MAX = 448.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed4:
    """A [K, N] weight in 4 bits. data uint8 [K'/2, N]; scales [K'/block, N] (E4M3 or bf16); tensor_scale f32."""

    data: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))              # logical K (before padding)
    block: int = dataclasses.field(metadata=dict(static=True))          # rows per scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.k, self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.data.size + self.scales.size * self.scales.dtype.itemsize + 4)


def _check(fmt: str, k: int, block: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown 4-bit format {fmt!r}; expected one of {FORMATS}")
    if fmt == "nvfp4" and k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs K divisible by {NVFP4_BLOCK} (one E4M3 scale per 16 values), got K={k}")
    if fmt == "int4":
        if block not in INT4_GROUPS:
            raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {block}")
        if k % block:
            raise ValueError(f"int4 with group {block} needs K divisible by {block}, got K={k}")


def e2m1_round(x):
    """Nearest E2M1 magnitude grid value (ties to even code) of |x| <= 6, sign kept. -> (code uint8, value)."""
    mag = jnp.minimum(jnp.abs(x), 6.0)
    # the grid spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: scale to unit spacing, round half to even
    step = jnp.where(mag < 2.0, 0.5, jnp.where(mag < 4.0, 1.0, 2.0))
    base = jnp.where(mag < 2.0, 0.0, jnp.where(mag < 4.0, 2.0, 4.0))
    q = jnp.round((mag - base) / step) * step + base
    grid = jnp.asarray(E2M1_MAGNITUDES, F32)
    code = jnp.argmin(jnp.abs(q[..., None] - grid), axis=-1).astype(jnp.uint8)
    code = code | jnp.where(x < 0, 8, 0).astype(jnp.uint8)
    return code, jnp.sign(x) * q


def e2m1_decode(code):
    """uint8 codes (low 4 bits) -> fp32 values."""
    c = code.astype(jnp.int32)
    e, m = (c >> 1) & 3, (c & 1).astype(F32)
    mag = jnp.where(e == 0, 0.5 * m, jnp.where(e == 1, 1.0 + 0.5 * m, jnp.where(e == 2, 2.0 + m, 4.0 + 2.0 * m)))
    return jnp.where((c & 8) != 0, -mag, mag)


def int4_decode(code):
    c = code.astype(jnp.int32) & 15
    return (c - 16 * (c >= 8)).astype(F32)


def _pad_rows(w, multiple):
    pad = (-w.shape[0]) % multiple
    return jnp.pad(w, ((0, pad), (0, 0))) if pad else w


def pack_nibbles(codes):
    """codes uint8 [K', N] (K' even) -> bytes [K'/2, N]: first half low nibble, second half high nibble."""
    half = codes.shape[0] // 2
    return (codes[:half] & 15) | ((codes[half:] & 15) << 4)


def unpack_nibbles(data):
    """bytes [K'/2, N] -> codes uint8 [K', N]."""
    return jnp.concatenate([data & 15, data >> 4], axis=0)


def quantize(w, fmt: str = "nvfp4", group: int = 128) -> Packed4:
    """w [K, N] (any float dtype) -> Packed4."""
    k, n = w.shape
    block = NVFP4_BLOCK if fmt == "nvfp4" else group
    _check(fmt, k, block)
    w32 = _pad_rows(w.astype(F32), 2 * block)
    blocks = w32.reshape(-1, block, n)
    block_amax = jnp.max(jnp.abs(blocks), axis=1)                         # [K'/block, N]
    if fmt == "nvfp4":
        amax = jnp.max(block_amax)
        tensor_scale = jnp.where(amax > 0, amax / (6.0 * E4M3_MAX), 1.0).astype(F32)
        scales = (block_amax / 6.0 / tensor_scale).astype(jnp.float8_e4m3fn)
        eff = scales.astype(F32) * tensor_scale                           # what dequantization will use
        codes, _ = e2m1_round(blocks / jnp.where(eff > 0, eff, 1.0)[:, None, :])
    else:
        tensor_scale = jnp.ones((), F32)
        scales = (block_amax / 7.0).astype(jnp.bfloat16)
        eff = scales.astype(F32)
        q = jnp.clip(jnp.round(blocks / jnp.where(eff > 0, eff, 1.0)[:, None, :]), -7, 7).astype(jnp.int32)
        codes = (q & 15).astype(jnp.uint8)
    return Packed4(pack_nibbles(codes.reshape(-1, n)), scales, tensor_scale, fmt, k, block)


def dequantize(p: Packed4):
    """Packed4 -> fp32 [K, N] (the reference the kernel must match)."""
    codes = unpack_nibbles(p.data)
    values = e2m1_decode(codes) if p.fmt == "nvfp4" else int4_decode(codes)
    scale = jnp.repeat(p.scales.astype(F32), p.block, axis=0) * p.tensor_scale
    return (values * scale)[:p.k]


def matmul4_reference(x, p: Packed4):
    """x [M, K] @ dequantize(p) with fp32 accumulation -> fp32 [M, N]."""
    return jnp.dot(x.astype(F32), dequantize(p), precision=jax.lax.Precision.HIGHEST)


def bf16_bytes(k: int, n: int) -> int:
    return 2 * k * n


__all__ = ["Packed4", "quantize", "dequantize", "matmul4_reference", "e2m1_round", "e2m1_decode", "int4_decode",
           "pack_nibbles", "unpack_nibbles"]
