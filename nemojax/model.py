"""NemotronH: embeddings -> pre-norm residual blocks by pattern -> norm_f -> untied lm_head (architecture.md §2),
with the optional multi-token-prediction head of Nemotron 3 (layers/mtp.py)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.block import Block
from nemojax.layers.common import dtypes, is_plain_dot, linear
from nemojax.layers.moe import ExpertBias
from nemojax.layers.mtp import MTPBlock, shift_left
from nemojax.layers.norm import RMSNorm
from nemojax.sharding import constrain

# What a checkpoint holds: trainable parameters and the MoE correction bias (a buffer, not trained by grads).
PERSISTENT = (nnx.Param, ExpertBias)
RESIDUAL = ("batch", "seq", "embed")           # logical axes of the residual stream (sharding.ACTIVATION_AXES)


def _call_block(block: Block, h: jax.Array, attention_mask: Optional[jax.Array]) -> jax.Array:
    return block(h, attention_mask)


def remat_block(policy: str):
    """How each block runs in training forwards: 'none' keeps every activation for the backward pass,
    'block' keeps only block inputs and recomputes the rest, 'dots' also keeps matmul outputs (recomputes only
    the cheap elementwise work: norms, activations, the SSD's exp/cumsum)."""
    if policy == "none":
        return _call_block
    saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
    return nnx.remat(_call_block, policy=saveable)


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
        self.mtp = (nnx.List([MTPBlock(cfg, rngs) for _ in range(cfg.num_nextn_predict_layers)])
                    if cfg.num_nextn_predict_layers else None)

    def hidden_states(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Final-normed hidden states [batch, seq, hidden]."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        h = constrain(self.embeddings(input_ids), RESIDUAL)
        run = remat_block(self.config.remat)
        for block in self.layers:
            h = constrain(run(block, h, attention_mask), RESIDUAL)
        return self.norm_f(h.astype(dtypes(self.config)[0]))

    def logits(self, h: jax.Array) -> jax.Array:
        out = self.embeddings.attend(h) if self.lm_head is None else self.lm_head(h)
        return constrain(out.astype(jnp.float32), ("batch", "seq", "vocab"))

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def output_weight(self) -> Optional[tuple[jax.Array, bool]]:
        """(weight, vocab_major) of a plain output layer, for losses that fuse it (train/linear_ce.py): the
        lm_head kernel [D, V], or the tied embedding table [V, D] with vocab_major=True. None where the output
        layer is quantized, packed or has a bias: losses then go through `logits`."""
        if self.lm_head is None:
            return (self.embeddings.embedding[...], True) if type(self.embeddings) is nnx.Embed else None
        head = self.lm_head
        plain = type(head) is nnx.Linear and head.bias is None and is_plain_dot(head.dot_general)
        return (head.kernel[...], False) if plain else None

    def forward_cached(self, input_ids: jax.Array, cache, attention_mask: Optional[jax.Array] = None,
                       prefill: bool = False, all_states: bool = False):
        """Appends input_ids [batch, t] at cache.pos. prefill=True requires an empty cache (static position 0,
        blocked attention over the new tokens). Returns (logits [b, t, V] fp32, hidden [b, t, D], new cache).
        all_states: Mamba entries of the returned cache hold the state after every new position."""
        from nemojax.cache import HybridCache

        b, t = input_ids.shape
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        pos = 0 if prefill else cache.pos
        key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask.astype(bool), (0, pos))
        h = self.embeddings(input_ids)
        entries = []
        for block, entry in zip(self.layers, cache.layers):
            h, entry = block.cached(h, entry, mask, pos, key_valid, all_states)
            entries.append(entry)
        hidden = self.norm_f(h.astype(dtypes(self.config)[0]))
        return self.logits(hidden), hidden, HybridCache(tuple(entries), key_valid, cache.pos + t)

    def mtp_hidden(self, hidden: jax.Array, input_ids: jax.Array, depth: int,
                   attention_mask: Optional[jax.Array] = None) -> list[jax.Array]:
        """MTP outputs for depths 1..depth: entry k-1 at position i predicts token i+k+1.
        hidden is the main model's post-norm_f output [batch, seq, hidden]."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (num_nextn_predict_layers = 0)")
        outs, h = [], hidden
        for k in range(1, depth + 1):
            block = self.mtp[min(k, len(self.mtp)) - 1]
            h = block(h, self.embeddings(shift_left(input_ids, k)), attention_mask)
            outs.append(h)
        return outs

    def forward_with_mtp(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                         depth: Optional[int] = None) -> tuple[jax.Array, list[jax.Array]]:
        """(main logits [b, t, V], [MTP logits [b, t, V] for depths 1..depth]); see mtp_hidden for the shift."""
        hidden = self.hidden_states(input_ids, attention_mask)
        mtp = self.mtp_hidden(hidden, input_ids, depth or self.config.mtp_depth, attention_mask)
        return self.logits(hidden), [self.logits(h) for h in mtp]


def make_forward(model: NemotronH):
    """A jitted fn(input_ids [batch, seq], attention_mask=None) -> logits [batch, seq, vocab] fp32 over the
    model's parameters as they are now. Uses jax.jit over the split (graphdef, state): on CPU, nnx.jit of the
    module measured 15-30% slower for a 123M model at 4096 tokens (its per-call state handling)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, input_ids, attention_mask):
        return nnx.merge(graphdef, state)(input_ids, attention_mask)

    return lambda input_ids, attention_mask=None: forward(state, input_ids, attention_mask)


def abstract_model(cfg: ModelConfig):
    """(graphdef, state) of a NemotronH with shapes only: no memory is allocated for the weights."""
    return nnx.split(nnx.eval_shape(lambda: NemotronH(cfg, nnx.Rngs(0))))


def materialize(graphdef, state, values: dict) -> NemotronH:
    """Merges an abstract state with `values` {path: array} for the persistent variables; runtime-only
    variables (router statistics) start at zero. Missing persistent values are an error."""
    for path, var in state.flat_state():
        if path in values:
            var.set_value(values.pop(path))
        elif isinstance(var, PERSISTENT):
            raise KeyError(f"no value for parameter {'.'.join(map(str, path))}")
        else:
            abstract = var.get_value()
            var.set_value(jnp.zeros(abstract.shape, abstract.dtype))
    if values:
        raise KeyError(f"values for unknown paths: {sorted(values)[:5]}")
    return nnx.merge(graphdef, state)


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
