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

from nemojax.cache import init_cache
from nemojax.generate import _prepare
from nemojax.layers.mamba2 import MambaState
from nemojax.model import NemotronH


class SpeculativeStats(NamedTuple):
    iterations: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _draft(model, mtp_out, last_token, mtp_cache, k):
    """k drafts from the MTP block: the first from `mtp_out` [b, D] (its output at the last verified position),
    then feeding back its own output at the following positions. Returns (drafts [b, k], mtp_cache)."""
    drafts = [jnp.argmax(model.logits(mtp_out), -1).astype(jnp.int32)]
    block = model.mtp[0]
    h, cache = mtp_out, mtp_cache
    ones = jnp.ones((h.shape[0], 1), jnp.int32)
    for _ in range(k - 1):
        out, cache = block.forward_cached(h[:, None], model.embeddings(drafts[-1][:, None]), cache, ones, cache.pos)
        h = out[:, 0]
        drafts.append(jnp.argmax(model.logits(h), -1).astype(jnp.int32))
    del last_token
    return jnp.stack(drafts, axis=1), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "k", "pad_id"))
def _speculative(graphdef, state, ids, mask, *, max_new_tokens, k, pad_id):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, p = ids.shape
    max_len = p + max_new_tokens + k + 1
    cache = init_cache(cfg, b, max_len)
    mtp_cache = init_cache(cfg, b, max_len, pattern=cfg.mtp_pattern)
    logits, hidden, cache = model.forward_cached(ids, cache, mask, prefill=True)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    # MTP over the prompt: position i pairs h_i with token i+1 (the first generated token for the last one).
    next_tokens = jnp.concatenate([ids[:, 1:], first[:, None]], axis=1)
    mtp_out, mtp_cache = model.mtp[0].forward_cached(hidden, model.embeddings(next_tokens), mtp_cache, mask, 0,
                                                     prefill=True)
    drafts, mtp_cache_drafted = _draft(model, mtp_out[:, -1], first, mtp_cache, k)
    out = jnp.full((b, max_new_tokens + k + 1), pad_id, jnp.int32).at[:, 0].set(first)
    j = jnp.arange(k + 1)

    def cond(carry):
        return carry[0] < max_new_tokens

    def body(carry):
        count, last, drafts, cache, mtp_cache, out, iters, accepted = carry
        pos = cache.pos
        chunk = jnp.concatenate([last[:, None], drafts], axis=1)                      # [b, k+1]
        logits, hidden, verified = model.forward_cached(chunk, cache, all_states=True)
        greedy = jnp.argmax(logits, -1).astype(jnp.int32)                             # [b, k+1]
        match = jnp.cumprod((drafts == greedy[:, :-1]).astype(jnp.int32), axis=1)     # leading matches
        a = jnp.min(match.sum(axis=1))                                                # accepted drafts
        bonus = jnp.take(greedy, a, axis=1)                                           # [b]
        emitted = jnp.where(j[None, :] < a, jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
        out = jax.lax.dynamic_update_slice(out, emitted, (0, count))
        # roll back: Mamba states as of position pos + a; KV past it is stale but rewritten before use
        layers = tuple(jax.tree.map(lambda s: jnp.take(s, a, axis=1), e) if isinstance(e, MambaState) else e
                       for e in verified.layers)
        cache = verified._replace(layers=layers, pos=pos + a + 1)
        # MTP over the verified positions pos .. pos + a (fixed width k+1; positions past a are rewritten later)
        mtp_tokens = jnp.where(j[None, :] < a, jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
        mtp_out, mtp_cache = model.mtp[0].forward_cached(hidden, model.embeddings(mtp_tokens),
                                                         mtp_cache._replace(pos=pos), jnp.ones_like(chunk), pos)
        mtp_cache = mtp_cache._replace(pos=pos + a + 1)
        new_drafts, mtp_cache_drafted = _draft(model, jnp.take(mtp_out, a, axis=1), bonus, mtp_cache, k)
        mtp_cache = mtp_cache_drafted._replace(pos=pos + a + 1)
        return count + a + 1, bonus, new_drafts, cache, mtp_cache, out, iters + 1, accepted + a

    carry = (jnp.asarray(1), first, drafts, cache, mtp_cache_drafted._replace(pos=jnp.asarray(p, jnp.int32)), out,
             jnp.asarray(0), jnp.asarray(0))
    _, _, _, _, _, out, iters, accepted = jax.lax.while_loop(cond, body, carry)
    return out[:, :max_new_tokens], iters, accepted


def speculative_generate(model: NemotronH, input_ids, max_new_tokens: int = 32, num_draft: int = 2,
                         attention_mask=None) -> tuple[np.ndarray, SpeculativeStats]:
    """Greedy generation with MTP drafting. Returns ([batch, prompt + new] tokens, stats). Same tokens as
    nemojax.generate(..., temperature=0)."""
    if model.mtp is None:
        raise ValueError("speculative decoding needs an MTP head (num_nextn_predict_layers > 0)")
    if "M" in model.config.mtp_pattern:
        raise NotImplementedError("MTP blocks with Mamba layers are not supported by the drafter yet")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    pad_id = model.config.pad_token_id or 0
    ids, mask = _prepare(input_ids, attention_mask, pad_id)
    graphdef, state = nnx.split(model)
    new, iters, accepted = _speculative(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                        max_new_tokens=max_new_tokens, k=num_draft, pad_id=pad_id)
    stats = SpeculativeStats(int(iters), int(iters) * num_draft, int(accepted))
    return np.concatenate([ids, np.asarray(new)], axis=1), stats
