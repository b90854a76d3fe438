"""Grouped-query causal self-attention without any position embedding (architecture.md §4)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.common import linear, output_init_std

F32 = jnp.float32


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array] = None,
                  q_positions: Optional[jax.Array] = None) -> jax.Array:
    """Causal GQA with scores and softmax in fp32.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim];
    key_mask [batch, kv_len] (True = real token); q_positions [q_len] or [batch, q_len] index of each query
    in the key axis (default: the last q_len keys). Returns [batch, q_len, heads, head_dim] in q's dtype.
    K/V heads are never repeated: queries are viewed as [kv_heads, heads_per_kv].
    """
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kvh})")
    qg = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkrd,bskd->bkrts", qg, k, preferred_element_type=F32) * (hd ** -0.5)
    if q_positions is None:
        q_positions = jnp.arange(t) + (s - t)
    q_positions = jnp.broadcast_to(q_positions, (b, t))
    allowed = q_positions[:, :, None] >= jnp.arange(s)[None, None, :]           # [b, t, s]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :].astype(bool)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrts,bskd->btkrd", probs, v, preferred_element_type=F32)
    return out.reshape(b, t, h, hd).astype(q.dtype)


class Attention(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden]; q_proj [hidden, heads*hd], k/v_proj [hidden, kv*hd]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = linear(cfg, d, self.num_heads * hd, rngs)
        self.k_proj = linear(cfg, d, self.num_kv_heads * hd, rngs)
        self.v_proj = linear(cfg, d, self.num_kv_heads * hd, rngs)
        self.o_proj = linear(cfg, self.num_heads * hd, d, rngs, std=output_init_std(cfg))

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def __call__(self, x: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        out = gqa_attention(q, k, v, key_mask=attention_mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
