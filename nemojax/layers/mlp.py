"""Squared-ReLU MLP without gate: down(relu(up(x))^2) (architecture.md §5)."""

from __future__ import annotations

import jax
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.common import linear, output_init_std


def relu2(x: jax.Array) -> jax.Array:
    r = jax.nn.relu(x)
    return r * r


class MLP(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden]. up_proj [hidden, F], down_proj [F, hidden]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, intermediate_size: int | None = None,
                 d_model: int | None = None):
        d = d_model or cfg.hidden_size
        f = intermediate_size or cfg.intermediate_size
        self.up_proj = linear(cfg, d, f, rngs, bias=cfg.mlp_bias)
        self.down_proj = linear(cfg, f, d, rngs, bias=cfg.mlp_bias, std=output_init_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(relu2(self.up_proj(x)))
