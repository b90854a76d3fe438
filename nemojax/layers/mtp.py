"""Multi-token prediction block of Nemotron 3 (architecture.md §11, DeepSeek-V3 style).

For depth k, position i combines the model's representation of token i with the embedding of token i+k and
predicts token i+k+1:
    h' = eh_proj([enorm(Embed(t_{i+k})), hnorm(h^{k-1}_i)])        # embedding first
    h' = blocks of mtp_pattern (e.g. '*E'), ordinary pre-norm residual blocks
    h^k = final_layernorm(h');  logits = lm_head(h^k)               # embedding and lm_head shared
h^0 is the main model's output after norm_f (what Megatron hands its MTP block and vLLM its drafter);
deeper steps feed back h^k. Depths beyond the number of blocks reuse the last block (Megatron's
mtp_use_repeated_layer).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.block import Block
from nemojax.layers.common import dtypes, linear
from nemojax.layers.norm import RMSNorm


class MTPBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, param = cfg.hidden_size, dtypes(cfg)[1]
        self.enorm = RMSNorm(d, cfg.layer_norm_epsilon, param)
        self.hnorm = RMSNorm(d, cfg.layer_norm_epsilon, param)
        self.eh_proj = linear(cfg, 2 * d, d, rngs)
        self.layers = nnx.List([Block(c, cfg, rngs) for c in cfg.mtp_pattern])
        self.final_layernorm = RMSNorm(d, cfg.layer_norm_epsilon, param)

    def __call__(self, hidden: jax.Array, next_embeds: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """hidden, next_embeds [batch, seq, hidden] -> [batch, seq, hidden]."""
        x = self.eh_proj(jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1))
        for block in self.layers:
            x = block(x, attention_mask)
        return self.final_layernorm(x)


    def forward_cached(self, hidden: jax.Array, next_embeds: jax.Array, cache, mask: jax.Array, pos,
                       prefill: bool = False):
        """The MTP block as a small causal model with its own HybridCache (pattern mtp_pattern): positions
        [pos, pos + t). Returns (output [b, t, hidden], new cache with pos + t)."""
        from nemojax.cache import HybridCache

        t = hidden.shape[1]
        p = 0 if prefill else pos
        key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask.astype(bool), (0, p))
        x = self.eh_proj(jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1))
        entries = []
        for block, entry in zip(self.layers, cache.layers):
            x, entry = block.cached(x, entry, mask.astype(jnp.int32), p, key_valid)
            entries.append(entry)
        return self.final_layernorm(x), HybridCache(tuple(entries), key_valid, jnp.asarray(p + t, jnp.int32))


def shift_left(ids: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """ids [batch, seq] -> ids[:, i + k] at position i, `fill` past the end."""
    return jnp.concatenate([ids[:, k:], jnp.full((ids.shape[0], k), fill, ids.dtype)], axis=1)
