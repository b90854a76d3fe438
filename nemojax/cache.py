"""HybridCache: the inference state of a NemotronH model (architecture.md §8), a pytree.

Per layer, aligned with the pattern:
    'M'  MambaState: conv prefixes (the last conv_kernel-1 pre-conv inputs of x, B, C) [batch, K-1, channels]
         and the fp32 SSM state [batch, heads, head_dim, state]. Its size does not depend on sequence length.
    '*'  KVCache: preallocated k, v [batch, kv_heads, max_len, head_dim] (head-major, so a decode step reads
         it without transposing).
    '-', 'E'  None (stateless).
key_valid [batch, max_len] marks the written, non-padding positions; pos is the number of positions written.
Rows of a batch share `pos`: prompts are left-padded, and padded tokens leave the Mamba states at exactly zero
(HF-style masking zeroes their inputs), so a left-padded row behaves like its unpadded prompt.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.layers.mamba2 import MambaState

F32 = jnp.float32


class KVCache(NamedTuple):
    k: jax.Array   # [batch, kv_heads, max_len, head_dim]
    v: jax.Array


class HybridCache(NamedTuple):
    layers: tuple
    key_valid: jax.Array   # [batch, max_len] bool
    pos: jax.Array         # [] int32


def init_layer_cache(char: str, cfg: ModelConfig, batch: int, max_len: int, dtype):
    if char == "M":
        k, gn = cfg.conv_kernel - 1, cfg.n_groups * cfg.ssm_state_size
        return MambaState(jnp.zeros((batch, k, cfg.mamba_inner), dtype), jnp.zeros((batch, k, gn), dtype),
                          jnp.zeros((batch, k, gn), dtype),
                          jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), F32))
    if char == "*":
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, pattern: Optional[str] = None) -> HybridCache:
    dtype = jnp.dtype(cfg.dtype)
    layers = tuple(init_layer_cache(c, cfg, batch, max_len, dtype) for c in (pattern or cfg.pattern))
    return HybridCache(layers, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def cache_bytes(cache: HybridCache) -> dict:
    """Bytes held by the Mamba states and by the attention KV caches."""
    mamba = sum(x.nbytes for layer in cache.layers if isinstance(layer, MambaState) for x in layer)
    kv = sum(x.nbytes for layer in cache.layers if isinstance(layer, KVCache) for x in layer)
    return {"mamba": int(mamba), "attention": int(kv)}
