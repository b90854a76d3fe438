"""Pre-norm residual block h + mixer(RMSNorm(h)) with the mixer chosen by the pattern character."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.attention import Attention
from nemojax.layers.common import dtypes
from nemojax.layers.mamba2 import Mamba2Mixer
from nemojax.layers.mlp import MLP
from nemojax.layers.moe import MoE
from nemojax.layers.norm import RMSNorm


def make_mixer(char: str, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if char == "M":
        return Mamba2Mixer(cfg, rngs)
    if char == "*":
        return Attention(cfg, rngs)
    if char == "-":
        return MLP(cfg, rngs)
    if char == "E":
        return MoE(cfg, rngs)
    raise ValueError(f"unknown layer character {char!r}")


class Block(nnx.Module):
    """h [batch, seq, hidden] -> h + mixer(RMSNorm(h))."""

    def __init__(self, char: str, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind = char
        # QKV_norm (a stability option) moves the attention block's normalisation after the projections
        skip_norm = char == "*" and cfg.attn_qkv_norm
        self.norm = None if skip_norm else RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtypes(cfg)[1])
        self.mixer = make_mixer(char, cfg, rngs)
        self.compute_dtype = dtypes(cfg)[0]
        # HF keeps the residual stream in the activation dtype; residual_in_fp32 (NVIDIA's option) keeps fp32.
        self.residual_dtype = jnp.float32 if cfg.residual_in_fp32 else self.compute_dtype

    def normed(self, h: jax.Array) -> jax.Array:
        x = h.astype(self.compute_dtype)
        return x if self.norm is None else self.norm(x)

    def __call__(self, h: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        x = self.normed(h)
        if self.kind in "M*":
            y = self.mixer(x, attention_mask=attention_mask)
        else:
            y = self.mixer(x)
        return h.astype(self.residual_dtype) + y.astype(self.residual_dtype)

    def cached(self, h: jax.Array, entry, attention_mask: jax.Array, pos, key_valid: jax.Array,
               all_states: bool = False):
        """Like __call__, continuing from this layer's cache entry; returns (h, new entry)."""
        x = self.normed(h)
        if self.kind == "M":
            y, entry = self.mixer(x, attention_mask=attention_mask, state=entry, return_state=True,
                                  all_states=all_states)
        elif self.kind == "*":
            y, entry = self.mixer(x, cache=entry, pos=pos, key_valid=key_valid)
        elif self.kind == "E":
            y = self.mixer(x, record_stats=False)
        else:
            y = self.mixer(x)
        return h.astype(self.residual_dtype) + y.astype(self.residual_dtype), entry
