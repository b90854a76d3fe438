"""Language-modelling losses: next-token cross entropy and the multi-token-prediction (MTP) loss."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nemojax.layers.mtp import shift_left


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross entropy. logits [b, t, V] fp32, labels [b, t] int, mask [b, t] (1 = counted)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1.0)


def shifted_mask(valid: jax.Array, k: int) -> jax.Array:
    """Positions i whose target i+k exists: valid[i] and valid[i+k] (valid [b, t], 1 = real token)."""
    return valid * shift_left(valid, k, fill=0)


def lm_and_mtp_losses(model, input_ids: jax.Array, valid: Optional[jax.Array] = None, depth: int = 0
                      ) -> tuple[jax.Array, list[jax.Array]]:
    """(next-token loss, [MTP loss per depth]). MTP depth k at position i predicts token i+k+1.
    input_ids [b, t]; valid [b, t] marks real (non-padding) tokens."""
    valid = jnp.ones_like(input_ids) if valid is None else valid
    if depth:
        main_logits, mtp_logits = model.forward_with_mtp(input_ids, depth=depth)
    else:
        main_logits, mtp_logits = model(input_ids), []
    main = cross_entropy(main_logits, shift_left(input_ids, 1), shifted_mask(valid, 1))
    mtp = [cross_entropy(lg, shift_left(input_ids, k + 1), shifted_mask(valid, k + 1))
           for k, lg in enumerate(mtp_logits, start=1)]
    return main, mtp
