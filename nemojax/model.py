"""NemotronH: embeddings -> pre-norm residual blocks by pattern -> norm_f -> untied lm_head (architecture.md §2),
with the optional multi-token-prediction head of Nemotron 3 (layers/mtp.py).

The inference cache is a tuple with one entry per block, each owned by its mixer (`init_cache`): MambaState
(conv prefixes and the fp32 SSM state, independent of length) or KVCache (k/v, valid keys, write position);
None for MLP and MoE layers.
"""

from __future__ import annotations

import collections
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.block import MIXER_IN, RESIDUAL, Block, run_blocks
from nemojax.layers.common import Mode, linear, mask_value
from nemojax.layers.moe import ExpertBias
from nemojax.layers.mtp import MTPBlock
from nemojax.layers.norm import RMSNorm
from nemojax.sharding import constrain

# What a checkpoint holds: trainable parameters and the MoE correction bias (a buffer, not trained by grads).
PERSISTENT = (nnx.Param, ExpertBias)


def shift_left(ids: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """ids [batch, seq] -> ids[:, i + k] at position i, `fill` past the end."""
    return jnp.concatenate([ids[:, k:], jnp.full((ids.shape[0], k), fill, ids.dtype)], axis=1)


class NemotronH(nnx.Module):
    """Causal LM. input_ids [batch, seq] int32 -> logits [batch, seq, vocab] float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                                    param_dtype=cfg.param_dtype, rngs=rngs,
                                    embedding_init=nnx.initializers.normal(cfg.initializer_range),
                                    embedding_metadata={"logical_axes": ("vocab", "embed")})
        self.layers = nnx.List([Block(c, cfg, rngs, f"layer{i}") for i, c in enumerate(cfg.pattern)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, cfg.param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs, ("embed", "vocab")))
        self.mtp = (nnx.List([MTPBlock(cfg, rngs, j) for j in range(cfg.num_nextn_predict_layers)])
                    if cfg.num_nextn_predict_layers else None)
        self.embed_mask = nnx.data(None)         # optional [hidden] 0/1 elastic mask (compress/elastic.py)

    def init_cache(self, batch: int, max_len: int) -> tuple:
        """Empty per-block inference caches for `batch` rows of up to `max_len` positions."""
        return tuple(block.mixer.init_cache(batch, max_len, self.config.compute_dtype) for block in self.layers)

    def forward(self, input_ids: jax.Array, *, mask: Optional[jax.Array] = None, cache: Optional[tuple] = None,
                mode: Mode = Mode.TRAIN) -> tuple[jax.Array, Optional[tuple]]:
        """input_ids [batch, t] -> (final-normed hidden states [batch, t, hidden], new cache). mask [batch, t]
        (1 = real token) marks left padding. TRAIN takes no cache; the other modes continue `cache`."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if (cache is None) != (mode is Mode.TRAIN):
            raise ValueError(f"mode {mode.name} {'needs' if cache is None else 'takes no'} cache")
        with jax.named_scope("embeddings"):
            h = constrain(self.embeddings(input_ids), RESIDUAL)
        keep = mask_value(self.embed_mask, jnp.float32)
        if keep is not None:
            h = h * keep.astype(h.dtype)
        h, cache = run_blocks(self.layers, h, mask=mask, caches=cache, mode=mode,
                              remat=self.config.runtime.remat, scan=self.config.runtime.scan_layers)
        # whole sequences again for the vocab-parallel lm_head (and the MTP head)
        return constrain(self.norm_f(h.astype(self.config.compute_dtype), keep), MIXER_IN), cache

    def logits(self, h: jax.Array) -> jax.Array:
        with jax.named_scope("lm_head"):
            out = self.embeddings.attend(h) if self.lm_head is None else self.lm_head(h)
            return constrain(out.astype(jnp.float32), ("batch",) + ("seq",) * (h.ndim - 2) + ("vocab",))

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        return self.logits(self.forward(input_ids, mask=attention_mask)[0])

    def mtp_hidden(self, hidden: jax.Array, input_ids: jax.Array, depth: int,
                   attention_mask: Optional[jax.Array] = None) -> list[jax.Array]:
        """MTP outputs for depths 1..depth (TRAIN mode): entry k-1 at position i predicts token i+k+1.
        hidden is the main model's post-norm_f output [batch, seq, hidden]."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (num_nextn_predict_layers = 0)")
        outs, h = [], hidden
        for k in range(1, depth + 1):
            block = self.mtp[min(k, len(self.mtp)) - 1]
            h, _ = block(h, self.embeddings(shift_left(input_ids, k)), mask=attention_mask)
            outs.append(h)
        return outs

    def forward_with_mtp(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                         depth: Optional[int] = None) -> tuple[jax.Array, list[jax.Array]]:
        """(main logits [b, t, V], [MTP logits [b, t, V] for depths 1..depth]); see mtp_hidden for the shift."""
        hidden, _ = self.forward(input_ids, mask=attention_mask)
        mtp = self.mtp_hidden(hidden, input_ids, depth or self.config.runtime.mtp_depth, attention_mask)
        return self.logits(hidden), [self.logits(h) for h in mtp]


def make_forward(model: NemotronH):
    """A jitted fn(input_ids [batch, seq], attention_mask=None) -> logits [batch, seq, vocab] fp32 over the
    model's parameters as they are now: a jax.jit over the split (graphdef, state), which skips nnx.jit's
    per-call graph handling."""
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


def cache_bytes(cache: tuple) -> dict:
    """Bytes held by each kind of layer cache, by type name (e.g. {'MambaState': ..., 'KVCache': ...})."""
    out = collections.Counter()
    for entry in (e for e in cache if e is not None):
        out[type(entry).__name__] += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(entry))
    return dict(out)
