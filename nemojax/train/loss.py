"""Language-modelling losses: next-token cross entropy, the multi-token-prediction (MTP) loss, and MoE load
balancing (the Switch aux loss and the aux-loss-free correction-bias update)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.layers.moe import AuxLoss, ExpertBias, RouterLoad
from nemojax.model import shift_left
from nemojax.quant.recipe import QuantDot
from nemojax.train.linear_ce import linear_cross_entropy


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross entropy. logits [b, t, V] fp32, labels [b, t] int, mask [b, t] (1 = counted)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1.0)


def next_token_ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Cross entropy of logits [b, t, V], computed on the inputs tokens[:, :-1], against tokens[:, 1:]
    (tokens [b, t + 1], every position counted)."""
    b, t = logits.shape[:2]
    if tokens.ndim != 2 or tokens.shape != (b, t + 1):
        raise ValueError(f"tokens must be [batch, seq + 1] for logits of [batch, seq] = {(b, t)}; got {tokens.shape}")
    return cross_entropy(logits, tokens[:, 1:], jnp.ones((b, t), jnp.float32))


def output_weight(model) -> Optional[tuple[jax.Array, bool]]:
    """(weight, vocab_major) of a plain output layer that the loss can fuse: the lm_head kernel [D, V], or the
    tied embedding table [V, D] with vocab_major=True. None where it is quantized, packed or has a bias."""
    head = model.lm_head
    if head is None:
        return (model.embeddings.embedding[...], True) if type(model.embeddings) is nnx.Embed else None
    plain = type(head) is nnx.Linear and head.bias is None and not isinstance(head.dot_general, QuantDot)
    return (head.kernel[...], False) if plain else None


def token_loss(model, hidden: jax.Array, labels: jax.Array, mask: jax.Array, chunk_tokens: int = 0) -> jax.Array:
    """Mean cross entropy of the model's output layer applied to hidden [b, t, D] against labels [b, t] over
    mask [b, t] (1 = counted). Fused with the output projection (linear_ce.py) unless that layer is quantized
    or packed."""
    out = output_weight(model)
    if out is None:
        return cross_entropy(model.logits(hidden), labels, mask)
    weight, vocab_major = out
    mask = mask.astype(jnp.float32)
    return linear_cross_entropy(hidden, weight, labels, mask / jnp.maximum(mask.sum(), 1.0),
                                vocab_major=vocab_major, compute_dtype=model.config.compute_dtype,
                                chunk_tokens=chunk_tokens)


def lm_and_mtp_losses(model, tokens: jax.Array, valid: Optional[jax.Array] = None, depth: int = 0,
                      chunk_tokens: int = 0) -> tuple[jax.Array, list[jax.Array]]:
    """(next-token loss, [MTP loss per depth]) of one window of tokens [b, t + 1].

    The model reads the t inputs tokens[:, :-1] (no wasted last position: with chunked SSD a 2^k + 1 long
    input would cost a whole extra chunk); position i predicts tokens[:, i + 1], and MTP depth k at position
    i predicts tokens[:, i + k + 1] from the embedding of tokens[:, i + k], which is always an input where its
    target exists. valid [b, t + 1] marks real (non-padding) tokens; a term counts where its input and
    target are both real. chunk_tokens: see linear_ce.linear_cross_entropy."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, seq + 1] with seq >= 1, got {tokens.shape}")
    valid = jnp.ones_like(tokens) if valid is None else valid
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden, _ = model.forward(inputs)
    mtp_hidden = model.mtp_hidden(hidden, inputs, depth) if depth else []

    def loss_at(h: jax.Array, k: int) -> jax.Array:        # k = 0: next token; k >= 1: MTP depth k
        mask = valid[:, :-1] * shift_left(valid[:, 1:], k, fill=0)
        return token_loss(model, h, shift_left(targets, k), mask, chunk_tokens)

    return loss_at(hidden, 0), [loss_at(h, k) for k, h in enumerate(mtp_hidden, start=1)]


def moe_aux_loss(model) -> jax.Array:
    """Sum of the MoE layers' load-balancing losses from the last TRAIN forward (0 when disabled)."""
    return sum((v for v in jax.tree.leaves(nnx.state(model, AuxLoss))), jnp.zeros((), jnp.float32))


def update_expert_bias(model, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3, used by Nemotron 3): after a step, raise the correction bias of
    under-loaded experts and lower it for over-loaded ones by `rate` * sign(mean load - load), from the router
    load each MoE layer recorded in the last TRAIN forward."""
    biases, loads = nnx.state(model, ExpertBias).flat_state(), nnx.state(model, RouterLoad).flat_state()
    for (bias_path, bias), (load_path, load) in zip(biases, loads, strict=True):
        assert bias_path[:-1] == load_path[:-1], (bias_path, load_path)     # one of each per MoE layer
        bias[...] = bias[...] + rate * jnp.sign(load[...].mean() - load[...])
