"""Greedy speculative decoding with the model's MTP head as drafter.

Per iteration, with the main model having processed positions < n and the token x_n known:
  1. verify: the main model runs [x_n, d_1 .. d_k] (k drafts) in one pass, keeping the Mamba state after
     every position; g_j = argmax of its logits at position n + j;
  2. accept the longest prefix with d_j == g_{j-1} (the minimum over the batch rows, so rows stay aligned),
     emit d_1 .. d_a and the bonus token g_a; roll the Mamba states back to position n + a (KV entries past it
     are overwritten before they are read again);
  3. the MTP block runs over positions n .. n + a with the main model's true hidden states and the accepted
     tokens, then drafts k new tokens autoregressively (feeding back its own output, as vLLM does).
Every emitted token is the main model's greedy choice given the emitted prefix, so the output equals plain
greedy decoding; the acceptance rate says how much of the drafting paid off.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.generate import on_mesh, prepare
from nemojax.layers.common import Mode
from nemojax.model import NemotronH
from nemojax.sharding import constrain_cache


class SpeculativeStats(NamedTuple):
    iterations: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _rewind(cache: tuple, pos, index=None) -> tuple:
    """Every layer cache back to `pos` written positions (index: the position of a VERIFY pass to keep), pinned
    to the mesh axes of its logical axes when a mesh is set."""
    return constrain_cache(tuple(None if entry is None else entry.rewind(pos, index) for entry in cache))


def _draft(model, mtp_out, mtp_cache, k):
    """k drafts from the MTP block: the first from `mtp_out` [b, D] (its output at the last verified position),
    then feeding back its own output at the following positions. Returns (drafts [b, k], mtp_cache)."""
    drafts = [jnp.argmax(model.logits(mtp_out), -1).astype(jnp.int32)]
    h, cache = mtp_out, mtp_cache
    for _ in range(k - 1):
        out, cache = model.mtp[0](h[:, None], model.embeddings(drafts[-1][:, None]), cache=cache, mode=Mode.DECODE)
        h = out[:, 0]
        drafts.append(jnp.argmax(model.logits(h), -1).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "k", "pad_id"))
def _speculative(graphdef, state, ids, mask, *, max_new_tokens, k, pad_id):
    model = nnx.merge(graphdef, state)
    mtp = model.mtp[0]
    b, p = ids.shape
    max_len = p + max_new_tokens + k + 1
    hidden, cache = model.forward(ids, mask=mask, cache=constrain_cache(model.init_cache(b, max_len)),
                                  mode=Mode.PREFILL)
    first = jnp.argmax(model.logits(hidden[:, -1]), -1).astype(jnp.int32)
    # MTP over the prompt: position i pairs h_i with token i+1 (the first generated token for the last one).
    next_tokens = jnp.concatenate([ids[:, 1:], first[:, None]], axis=1)
    mtp_out, mtp_cache = mtp(hidden, model.embeddings(next_tokens), mask=mask,
                             cache=mtp.init_cache(b, max_len, model.config.compute_dtype), mode=Mode.PREFILL)
    drafts, mtp_cache = _draft(model, mtp_out[:, -1], mtp_cache, k)
    out = jnp.full((b, max_new_tokens + k + 1), pad_id, jnp.int32).at[:, 0].set(first)
    j = jnp.arange(k + 1)

    def cond(carry):
        return carry[0] < max_new_tokens

    def body(carry):
        count, last, drafts, cache, mtp_cache, out, iters, accepted = carry
        pos = p + count - 1               # positions in the cache: the prompt and every emitted token but the last
        chunk = jnp.concatenate([last[:, None], drafts], axis=1)                      # [b, k+1]
        hidden, verified = model.forward(chunk, cache=cache, mode=Mode.VERIFY)
        greedy = jnp.argmax(model.logits(hidden), -1).astype(jnp.int32)               # [b, k+1]
        match = jnp.cumprod((drafts == greedy[:, :-1]).astype(jnp.int32), axis=1)     # leading matches
        a = jnp.min(match.sum(axis=1))                                                # accepted drafts
        bonus = jnp.take(greedy, a, axis=1)                                           # [b]
        emitted = jnp.where(j[None, :] < a, jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
        out = jax.lax.dynamic_update_slice(out, emitted, (0, count))
        # roll back to position pos + a: Mamba states kept by the verify pass, KV past it is rewritten before use
        cache = _rewind(verified, pos + a + 1, index=a)
        # MTP over the verified positions pos .. pos + a (fixed width k+1; positions past a are rewritten later)
        mtp_out, mtp_cache = mtp(hidden, model.embeddings(emitted), cache=_rewind(mtp_cache, pos), mode=Mode.VERIFY)
        new_drafts, mtp_cache = _draft(model, jnp.take(mtp_out, a, axis=1), _rewind(mtp_cache, pos + a + 1), k)
        return (count + a + 1, bonus, new_drafts, cache, _rewind(mtp_cache, pos + a + 1), out, iters + 1,
                accepted + a)

    carry = (jnp.asarray(1), first, drafts, cache, _rewind(mtp_cache, p), out, jnp.asarray(0), jnp.asarray(0))
    _, _, _, _, _, out, iters, accepted = jax.lax.while_loop(cond, body, carry)
    return out[:, :max_new_tokens], iters, accepted


def speculative_generate(model: NemotronH, input_ids, max_new_tokens: int = 32, num_draft: int = 2,
                         attention_mask=None, mesh=None) -> tuple[np.ndarray, SpeculativeStats]:
    """Greedy generation with MTP drafting. Returns ([batch, prompt + new] tokens, stats). Same tokens as
    nemojax.generate(..., temperature=0). mesh: run sharded, as in generate."""
    if model.mtp is None:
        raise ValueError("speculative decoding needs an MTP head (num_nextn_predict_layers > 0)")
    if "M" in model.config.mtp_pattern:
        raise NotImplementedError("MTP blocks with Mamba layers are not supported by the drafter yet")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    ids, mask, pad_id = prepare(model, input_ids, attention_mask, max_new_tokens)
    context, ids_d, mask_d = on_mesh(model, mesh, ids, mask)
    graphdef, state = nnx.split(model)
    with context():
        new, iters, accepted = _speculative(graphdef, state, ids_d, mask_d, max_new_tokens=max_new_tokens,
                                            k=num_draft, pad_id=pad_id)
    stats = SpeculativeStats(int(iters), int(iters) * num_draft, int(accepted))
    return np.concatenate([ids, np.asarray(new)], axis=1), stats
