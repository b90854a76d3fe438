"""Shared pieces for the layers: dtype lookup and the linear layer with the model's init."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig


def dtypes(cfg: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype)."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def output_init_std(cfg: ModelConfig) -> float:
    """Megatron's scaled init for projections that write into the residual stream: sigma / sqrt(2 L)."""
    if not cfg.rescale_prenorm_residual:
        return cfg.initializer_range
    return cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers)


def linear(cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, *, bias: bool = False,
           std: float | None = None) -> nnx.Linear:
    """nnx.Linear with kernel [d_in, d_out] ~ N(0, std) (default `initializer_range`) and zero bias."""
    compute, param = dtypes(cfg)
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=compute, param_dtype=param,
                      kernel_init=nnx.initializers.normal(cfg.initializer_range if std is None else std),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)
