"""Pre-norm residual block h + mixer(RMSNorm(h)), the mixer built from the pattern-character table
(config.LAYER_KINDS), and the one loop that runs a stack of blocks (the model's and the MTP head's)."""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import LAYER_KINDS, ModelConfig
from nemojax.layers.common import Mode
from nemojax.layers.norm import RMSNorm
from nemojax.sharding import constrain

RESIDUAL = ("batch", "seq", "act_embed")       # logical axes of the residual stream (sharding.RULES)


def make_mixer(char: str, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    module, cls = LAYER_KINDS[char].mixer.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, rngs)


class Block(nnx.Module):
    """h [batch, seq, hidden] -> h + mixer(RMSNorm(h)), in a profile scope named after the layer (`scope`)."""

    def __init__(self, char: str, cfg: ModelConfig, rngs: nnx.Rngs, scope: str = "block"):
        self.kind = char
        self.scope = f"{scope}_{LAYER_KINDS[char].name}"
        self.mixer = make_mixer(char, cfg, rngs)
        # a mixer may normalise its own inputs instead (attention with the QKV-norm stability option)
        pre_norm = getattr(self.mixer, "pre_norm", True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, cfg.param_dtype) if pre_norm else None
        self.compute_dtype = cfg.compute_dtype
        # HF keeps the residual stream in the activation dtype; residual_in_fp32 (NVIDIA's option) keeps fp32.
        self.residual_dtype = jnp.float32 if cfg.residual_in_fp32 else self.compute_dtype

    def __call__(self, h: jax.Array, *, mask: Optional[jax.Array] = None, cache=None, mode: Mode = Mode.TRAIN):
        """Returns (h', the mixer's new cache); the mixer gets the same arguments whatever its kind."""
        with jax.named_scope(self.scope):
            x = h.astype(self.compute_dtype)
            y, cache = self.mixer(x if self.norm is None else self.norm(x), mask=mask, cache=cache, mode=mode)
            return h.astype(self.residual_dtype) + y.astype(self.residual_dtype), cache


def _call(block: Block, h, mask, cache, mode):
    return block(h, mask=mask, cache=cache, mode=mode)


def run_blocks(blocks: Sequence[Block], h: jax.Array, *, mask: Optional[jax.Array], caches: Optional[Sequence],
               mode: Mode, remat: str = "none") -> tuple[jax.Array, Optional[tuple]]:
    """h through the blocks in order -> (h, new caches: one per block, or None in TRAIN mode).

    remat (TRAIN mode only): 'none' keeps every activation for the backward pass, 'block' keeps only block
    inputs and recomputes the rest, 'dots' also keeps matmul outputs (recomputes only the cheap elementwise
    work: norms, activations, the SSD's exp/cumsum)."""
    call = _call
    if mode is Mode.TRAIN and remat != "none":
        saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
        call = nnx.remat(_call, policy=saveable, static_argnums=(4,))
    new = []
    for block, cache in zip(blocks, caches if caches is not None else [None] * len(blocks), strict=True):
        h, cache = call(block, h, mask, cache, mode)
        h = constrain(h, RESIDUAL)
        new.append(cache)
    return h, None if caches is None else tuple(new)
