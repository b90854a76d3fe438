"""Squared-ReLU MLP without gate: down(relu(up(x))^2) (architecture.md §5)."""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.common import Mode, channel_stat, linear, mask_value, output_init_std, record


def relu2(x: jax.Array) -> jax.Array:
    r = jax.nn.relu(x)
    return r * r


class MLP(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden]. up_proj [hidden, F], down_proj [F, hidden]. Stateless."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, intermediate_size: int | None = None):
        d, f = cfg.hidden_size, intermediate_size or cfg.intermediate_size
        self.up_proj = linear(cfg, d, f, rngs, ("embed", "mlp"), bias=cfg.mlp_bias)
        self.down_proj = linear(cfg, f, d, rngs, ("mlp", "embed"), bias=cfg.mlp_bias, std=output_init_std(cfg))
        self.neuron_mask = nnx.data(None)        # optional [F] 0/1 elastic mask (compress/elastic.py)

    def init_cache(self, batch: int, max_len: int, dtype) -> None:
        return None

    def ffn(self, x: jax.Array) -> jax.Array:
        a = relu2(self.up_proj(x))
        if a.ndim == 3:                          # [batch, seq, F]; MoE's shared expert sees flat tokens
            record(self, lambda: {"neurons": channel_stat(a)})
        if self.neuron_mask is not None:
            a = a * mask_value(self.neuron_mask, a.dtype)
        return self.down_proj(a)

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, cache=None, mode: Mode = Mode.TRAIN):
        return self.ffn(x), None
