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
from nemojax.layers.block import MIXER_IN, RESIDUAL, Block, run_blocks
from nemojax.layers.common import Mode, linear
from nemojax.layers.norm import RMSNorm
from nemojax.sharding import constrain


class MTPBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, index: int = 0):
        d, eps, pd = cfg.hidden_size, cfg.layer_norm_epsilon, cfg.param_dtype
        self.enorm = RMSNorm(d, eps, pd)
        self.hnorm = RMSNorm(d, eps, pd)
        self.eh_proj = linear(cfg, 2 * d, d, rngs, ("concat_embed", "embed"))
        self.layers = nnx.List([Block(c, cfg, rngs, f"mtp{index}_layer{i}") for i, c in enumerate(cfg.mtp_pattern)])
        self.final_layernorm = RMSNorm(d, eps, pd)

    def init_cache(self, batch: int, max_len: int, dtype) -> tuple:
        return tuple(block.mixer.init_cache(batch, max_len, dtype) for block in self.layers)

    def __call__(self, hidden: jax.Array, next_embeds: jax.Array, *, mask: Optional[jax.Array] = None,
                 cache: Optional[tuple] = None, mode: Mode = Mode.TRAIN) -> tuple[jax.Array, Optional[tuple]]:
        """hidden, next_embeds [batch, seq, hidden] -> (output [batch, seq, hidden], new cache). As a small causal
        model over positions, with its own per-layer caches (init_cache) in the inference modes."""
        x = constrain(self.eh_proj(jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1)),
                      RESIDUAL)
        x, cache = run_blocks(self.layers, x, mask=mask, caches=cache, mode=mode)
        return constrain(self.final_layernorm(x), MIXER_IN), cache      # whole sequences for the lm_head
