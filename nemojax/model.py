"""NemotronH: embeddings -> pre-norm residual blocks by pattern -> norm_f -> untied lm_head (architecture.md §2)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.attention import Attention
from nemojax.layers.common import dtypes, linear
from nemojax.layers.mamba2 import Mamba2Mixer
from nemojax.layers.mlp import MLP
from nemojax.layers.norm import RMSNorm


def make_mixer(char: str, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if char == "M":
        return Mamba2Mixer(cfg, rngs)
    if char == "*":
        return Attention(cfg, rngs)
    if char == "-":
        return MLP(cfg, rngs)
    if char == "E":
        raise NotImplementedError("MoE ('E') layers are not implemented yet (tracked by the Nemotron 3 MoE issue)")
    raise ValueError(f"unknown layer character {char!r}")


class Block(nnx.Module):
    """h + mixer(RMSNorm(h)). h [batch, seq, hidden]."""

    def __init__(self, char: str, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind = char
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtypes(cfg)[1])
        self.mixer = make_mixer(char, cfg, rngs)
        self.compute_dtype = dtypes(cfg)[0]
        # HF keeps the residual stream in the activation dtype; residual_in_fp32 (NVIDIA's option) keeps fp32.
        self.residual_dtype = jnp.float32 if cfg.residual_in_fp32 else self.compute_dtype

    def __call__(self, h: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        x = self.norm(h.astype(self.compute_dtype))
        if self.kind in "M*":
            y = self.mixer(x, attention_mask=attention_mask)
        else:
            y = self.mixer(x)
        return h.astype(self.residual_dtype) + y.astype(self.residual_dtype)


class NemotronH(nnx.Module):
    """Causal LM. input_ids [batch, seq] int32 -> logits [batch, seq, vocab] float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        compute, param = dtypes(cfg)
        self.embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=compute, param_dtype=param,
                                    embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
        self.layers = nnx.List([Block(c, cfg, rngs) for c in cfg.pattern])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, param)
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Final-normed hidden states [batch, seq, hidden]."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        h = self.embeddings(input_ids)
        for block in self.layers:
            h = block(h, attention_mask)
        return self.norm_f(h.astype(dtypes(self.config)[0]))

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embeddings.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, attention_mask))


def make_forward(model: NemotronH):
    """A jitted fn(input_ids [batch, seq], attention_mask=None) -> logits [batch, seq, vocab] fp32 over the
    model's parameters as they are now. Uses jax.jit over the split (graphdef, state): on CPU, nnx.jit of the
    module measured 15-30% slower for a 123M model at 4096 tokens (its per-call state handling)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, input_ids, attention_mask):
        return nnx.merge(graphdef, state)(input_ids, attention_mask)

    return lambda input_ids, attention_mask=None: forward(state, input_ids, attention_mask)


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
