"""4-bit serving export: pack a model's linear weights (and optionally the embedding table) to NVFP4 or int4 and
run them through the 4-bit matmul (convert/orbax.py saves and loads packed models: save_packed, load_packed).

The Pallas kernel (pallas_kernels.matmul4) runs on GPU and TPU; elsewhere the layers use the XLA fallback
x @ dequantize(W4), which computes the same numbers. MoE expert weights, norms, the convolution and the SSM
parameters stay in the model's dtype.

`fake_quantize_weights(model, fmt)` is the unpacked counterpart: the same quantize-dequantize of each weight
applied inside a high-precision matmul. A packed model and its fake-quantized counterpart hold identical weight
values, so they must produce the same logits up to summation order and the same greedy tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ConfigError
from nemojax.model import PERSISTENT, NemotronH
from pallas_kernels.matmul4 import Packed4, dequantize, matmul4, matmul4_reference, quantize
from pallas_kernels.matmul4.formats import FORMATS, INT4_GROUPS, NVFP4_BLOCK

F32 = jnp.float32


class PackedWeight(nnx.Variable):
    """A 4-bit weight's storage: nibble bytes, block scales or the tensor scale (not trainable)."""


@dataclasses.dataclass(frozen=True)
class PackSpec:
    fmt: str = "nvfp4"          # nvfp4 | int4
    group: int = 128            # int4 rows per scale (32/64/128); nvfp4 always uses 16
    embeddings: bool = True     # also pack the embedding table (gathered per token, dequantized on the fly)
    lm_head: bool = True

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ConfigError(f"pack format must be one of {FORMATS}, got {self.fmt!r}")
        if self.fmt == "int4" and self.group not in INT4_GROUPS:
            raise ConfigError(f"int4 group must be one of {INT4_GROUPS}, got {self.group}")

    def block_for(self, k: int) -> Optional[int]:
        """Rows per scale for a weight with K rows, or None when K fits no block size of the format. int4 takes
        the largest group <= spec.group that splits K into an even number of groups, because the packed layout
        pads K to a multiple of 2 * group (a 128-row weight packed with group 128 would double in size)."""
        if self.fmt == "nvfp4":
            return NVFP4_BLOCK if k % NVFP4_BLOCK == 0 else None
        groups = [g for g in sorted(INT4_GROUPS, reverse=True) if g <= self.group]
        for fits in ([g for g in groups if k % (2 * g) == 0], [g for g in groups if k % g == 0]):
            if fits:
                return fits[0]
        return None


def _matmul4(x2: jax.Array, p: Packed4, compute_dtype) -> jax.Array:
    """x2 [M, K] @ W4 -> fp32 [M, N]: the Pallas kernel on GPU/TPU, elsewhere XLA's dequantize-then-dot
    reference (the same values the kernel's tiles compute)."""
    if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
        return matmul4(x2, p, compute_dtype=compute_dtype)
    return matmul4_reference(x2, p)


def _quantize(w: jax.Array, spec: PackSpec) -> Optional[Packed4]:
    """w [K, N] in the spec's format, or None when K fits none of its block sizes."""
    block = spec.block_for(w.shape[0])
    return None if block is None else quantize(w, spec.fmt, block)


class _Packed(nnx.Module):
    """Holds one Packed4 as variables; E4M3 scales are stored as their bytes (uint8) for checkpoint formats.
    Nibble bytes [K/2, N] and scales [K/block, N] keep the logical axes `axes` of the [K, N] weight."""

    def __init__(self, p: Packed4, axes: tuple):
        self.data = PackedWeight(p.data, logical_axes=axes)
        self.e4m3 = p.scales.dtype == jnp.float8_e4m3fn
        self.scales = PackedWeight(jax.lax.bitcast_convert_type(p.scales, jnp.uint8) if self.e4m3 else p.scales,
                                   logical_axes=axes)
        self.tensor_scale = PackedWeight(p.tensor_scale, logical_axes=())
        self.fmt, self.k, self.block = p.fmt, p.k, p.block

    def packed(self, columns: Optional[jax.Array] = None) -> Packed4:
        """The Packed4 (optionally only the given output columns)."""
        data, scales = self.data[...], self.scales[...]
        if self.e4m3:
            scales = jax.lax.bitcast_convert_type(scales, jnp.float8_e4m3fn)
        if columns is not None:
            data, scales = jnp.take(data, columns, axis=1), jnp.take(scales, columns, axis=1)
        return Packed4(data, scales, self.tensor_scale[...], self.fmt, self.k, self.block)


class PackedLinear(_Packed):
    """y [..., N] = x [..., K] @ W4 [K, N] (+ bias), accumulated in fp32, returned in the compute dtype."""

    def __init__(self, p: Packed4, bias: Optional[jax.Array], compute_dtype, axes: tuple):
        super().__init__(p, axes)
        self.bias = None if bias is None else nnx.Param(bias, logical_axes=axes[1:])
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _matmul4(x.reshape(-1, self.k).astype(self.compute_dtype), self.packed(), self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(F32)
        return y.reshape(*x.shape[:-1], -1).astype(self.compute_dtype)


class PackedEmbed(_Packed):
    """The embedding table E [V, D] packed as the [D, V] matrix of the tied output layer: a token's row is one
    packed column, dequantized after the gather."""

    def __init__(self, p: Packed4, compute_dtype):
        super().__init__(p, ("embed", "vocab"))
        self.compute_dtype = compute_dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = dequantize(self.packed(ids.reshape(-1))).T                  # [tokens, D]
        return rows.reshape(*ids.shape, self.k).astype(self.compute_dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """h [..., D] @ E^T -> [..., V] (tied output layer)."""
        logits = _matmul4(h.reshape(-1, self.k).astype(self.compute_dtype), self.packed(), self.compute_dtype)
        return logits.reshape(*h.shape[:-1], -1).astype(self.compute_dtype)


def _linear_slots(model: NemotronH, spec: PackSpec):
    """(parent module, attribute name, nnx.Linear) for every linear layer to pack."""
    slots = []
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or isinstance(node, _Packed):
            continue
        for name, value in list(vars(node).items()):
            if isinstance(value, nnx.Linear) and (spec.lm_head or not (node is model and name == "lm_head")):
                slots.append((node, name, value))
    return slots


def pack_model(model: NemotronH, spec: PackSpec = PackSpec()) -> dict:
    """Replaces the model's linear layers (and embeddings if spec.embeddings) by packed ones, in place.
    Returns {"packed": n, "skipped": [names whose K fits no block size]}."""
    compute = model.config.compute_dtype
    packed, skipped = 0, []
    for parent, name, lin in _linear_slots(model, spec):
        p = _quantize(lin.kernel[...], spec)
        if p is None:
            skipped.append(name)
            continue
        bias = None if lin.bias is None else lin.bias[...]
        setattr(parent, name, PackedLinear(p, bias, compute, lin.kernel.get_metadata()["logical_axes"]))
        packed += 1
    if spec.embeddings:
        p = _quantize(model.embeddings.embedding[...].T, spec)                # the table [V, D] as [D, V]
        if p is None:
            skipped.append("embeddings")
        else:
            model.embeddings = PackedEmbed(p, compute)
            packed += 1
    return {"packed": packed, "skipped": skipped}


def fake_quantize_weights(model: NemotronH, spec: PackSpec = PackSpec()) -> NemotronH:
    """The unpacked counterpart of pack_model: each weight replaced, in place, by dequantize(quantize(w)) with
    the same format and block sizes, kept in fp32 high-precision layers."""
    for _, _, lin in _linear_slots(model, spec):
        p = _quantize(lin.kernel[...], spec)
        if p is not None:
            lin.kernel[...] = dequantize(p).astype(lin.kernel.dtype)
    if spec.embeddings:
        table = model.embeddings.embedding
        p = _quantize(table[...].T, spec)
        if p is not None:
            table[...] = dequantize(p).T.astype(table.dtype)
    return model


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every stored weight (parameters, packed weights, MoE bias buffers)."""
    state = nnx.state(model, (*PERSISTENT, PackedWeight))
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state))
