"""RMSNorm and the gated group RMSNorm of the Mamba-2 mixer (architecture.md §2, §3.7)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.layers.common import param

F32 = jnp.float32


class RMSNorm(nnx.Module):
    """y = (w * x * rsqrt(mean(x^2) + eps)) computed in fp32, cast back to x's dtype. weight [dim] with logical
    axis `axis` (norm weights are replicated by default)."""

    def __init__(self, dim: int, eps: float, param_dtype=F32, axis: str = "norm"):
        self.weight = param(jnp.ones((dim,), param_dtype), (axis,))
        self.eps = eps

    def __call__(self, x: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
        """keep [dim] (0/1, optional): channels left out; they come out zero and the mean square is over the
        kept channels only (what the norm of the layer with them pruned computes)."""
        x32 = x.astype(F32)
        if keep is None:
            mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        else:
            keep = keep.astype(F32)
            x32 = x32 * keep
            mean_square = jnp.sum(x32 * x32, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(keep), 1.0)
        y = x32 * jax.lax.rsqrt(mean_square + self.eps)
        return (self.weight[...].astype(F32) * y).astype(x.dtype)


class GatedGroupRMSNorm(nnx.Module):
    """Mamba-2's norm_before_gate=False gated norm: RMSNorm_group(y * silu(z)) * w, all in fp32.

    y, z: [..., inner]; groups are contiguous blocks of inner // groups channels. Returns fp32. The weight
    [inner] is laid out like the Mamba heads (logical axis "mamba_heads").
    """

    def __init__(self, dim: int, groups: int, eps: float, param_dtype=F32):
        if dim % groups:
            raise ValueError(f"gated norm width {dim} is not divisible by n_groups {groups}")
        self.weight = param(jnp.ones((dim,), param_dtype), ("mamba_heads",))
        self.groups = groups
        self.eps = eps

    def __call__(self, y: jax.Array, z: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
        """keep [inner] (0/1, optional): channels left out; they come out zero and each group's mean square is
        over its kept channels only (what the norm of the layer with them pruned computes)."""
        g = y.astype(F32) * jax.nn.silu(z.astype(F32))
        shape = g.shape
        split = shape[:-1] + (self.groups, shape[-1] // self.groups)
        g = g.reshape(split)
        if keep is None:
            mean_square = jnp.mean(g * g, axis=-1, keepdims=True)
        else:
            keep = keep.reshape(split[-2:])
            g = g * keep
            mean_square = jnp.sum(g * g, axis=-1, keepdims=True) / jnp.maximum(keep.sum(-1, keepdims=True), 1.0)
        g = g * jax.lax.rsqrt(mean_square + self.eps)
        return self.weight[...].astype(F32) * g.reshape(shape)
