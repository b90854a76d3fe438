"""SSD in XLA: the chunked algorithm (the default) and a parallel associative scan. Contracts and padding in
nemojax/ssd/__init__.py; grouped B/C are never repeated to heads (heads are viewed as [groups, per_group])."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _by_group(a, groups: int):
    """[b, t, heads, ...] -> [b, t, groups, heads_per_group, ...]."""
    return a.reshape(a.shape[:2] + (groups, a.shape[2] // groups) + a.shape[3:])


def ssd_associative(x, dt, A, B, C, state0):
    """Parallel prefix form: combine (a1, u1) then (a2, u2) = (a1*a2, a2*u1 + u2). Materialises every per-token
    state [b, t, h, p, n]; meant for short sequences and cross-checks."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x32, dt32 = x.astype(F32), dt.astype(F32)
    decay = jnp.exp(dt32 * A.astype(F32))                                    # [b,t,h]
    dx = _by_group(dt32[..., None] * x32, g)                                 # [b,t,g,r,p]
    increments = jnp.einsum("btgrp,btgn->btgrpn", dx, B.astype(F32)).reshape(b, t, h, p, n)
    increments = increments.at[:, 0].add(decay[:, 0, :, None, None] * state0)

    def combine(left, right):
        a1, u1 = left
        a2, u2 = right
        return a1 * a2, a2[..., None, None] * u1 + u2

    _, states = jax.lax.associative_scan(combine, (decay, increments), axis=1)   # [b,t,h,p,n]
    y = jnp.einsum("btgrpn,btgn->btgrp", _by_group(states, g), C.astype(F32)).reshape(b, t, h, p)
    return y, states[:, -1]


def segment_sums(a):
    """a [..., q] -> seg [..., l, s] with seg[l, s] = sum_{s<k<=l} a_k for l >= s, else -inf.

    The sums are accumulated directly rather than taken as cumsum_l - cumsum_s: the difference of two long
    cumulative sums loses ~1e-5 relative precision in fp32."""
    q = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], a.shape + (q,))                    # rep[l, s] = a_l
    seg = jnp.cumsum(jnp.where(jnp.tril(jnp.ones((q, q), dtype=bool), -1), rep, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((q, q), dtype=bool)), seg, -jnp.inf)


def ssd_chunked(x, dt, A, B, C, state0, chunk_size: int):
    """The SSD block decomposition over chunks of q = chunk_size tokens (the sequence is a whole number of
    chunks): the [T, T] semiseparable matrix splits into diagonal blocks (attention-like within a chunk) and
    low-rank off-diagonal blocks, factored as C (left) x decay across chunks (centre) x B (right).

    Head-major inside ([batch, groups, heads_per_group, chunk, ...]) so every contraction is a batched matmul
    with its batch dims leading (no transposes of the [l, s] score blocks)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep, q = h // g, chunk_size
    if t % q:
        raise ValueError(f"ssd_chunked takes whole chunks: seq {t} is not a multiple of {q} (use nemojax.ssd.ssd)")
    nc = t // q

    def to_chunks(a):                                      # [b, t, ...] -> [b, c, q, ...]
        return a.astype(F32).reshape((b, nc, q) + a.shape[2:])

    xc = to_chunks(x).reshape(b, nc, q, g, rep, p).transpose(0, 3, 4, 1, 2, 5)   # [b,g,r,c,q,p]
    dtc = to_chunks(dt).reshape(b, nc, q, g, rep).transpose(0, 3, 4, 1, 2)       # [b,g,r,c,q]
    Bc = to_chunks(B).transpose(0, 3, 1, 2, 4)                                   # [b,g,c,q,n]
    Cc = to_chunks(C).transpose(0, 3, 1, 2, 4)
    a = dtc * A.astype(F32).reshape(1, g, rep, 1, 1)                             # log-decay per token
    acs = jnp.cumsum(a, axis=-1)

    # Step 1, diagonal blocks: outputs from inputs of the same chunk,
    # y_l = sum_{s<=l} (C_l . B_s) exp(seg[l, s]) dt_s x_s.
    cb = jnp.einsum("bgcln,bgcsn->bgcls", Cc, Bc)
    scores = cb[:, :, None] * jnp.exp(segment_sums(a)) * dtc[..., None, :]        # [b,g,r,c,l,s]
    y = jnp.einsum("bgrcls,bgrcsp->bgrclp", scores, xc)

    # Step 2, right factor (B): the state each chunk's own inputs leave at its end.
    after = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1) - a              # sum_{k>s} a_k
    weighted_x = xc * (jnp.exp(after) * dtc)[..., None]
    # B broadcast over heads_per_group makes (b, g, r, c) one batch axis of plain matmuls, which XLA:CPU runs
    # faster than a contraction with r left as a free dimension.
    B_heads = jnp.broadcast_to(Bc[:, :, None], (b, g, rep) + Bc.shape[2:])
    chunk_states = jnp.einsum("bgrcsp,bgrcsn->bgrcpn", weighted_x, B_heads)

    # Step 3, centre factor (A): pass states across chunks, each decayed by its chunk's total decay; a scan
    # linear in the number of chunks.
    def carry_state(state, inputs):                        # state: [b,g,r,p,n] entering the chunk
        decay_c, new_c = inputs
        return decay_c[..., None, None] * state + new_c, state

    final, entering = jax.lax.scan(carry_state, state0.reshape(b, g, rep, p, n),
                                   (jnp.moveaxis(jnp.exp(acs[..., -1]), 3, 0), jnp.moveaxis(chunk_states, 3, 0)))
    entering = jnp.moveaxis(entering, 0, 3)                                      # [b,g,r,c,p,n]

    # Step 4, left factor (C): the state entering each chunk, decayed to each position and read out with C,
    # as one batched matmul over (b, g, c): [l, n] @ [n, (r p)].
    entering_t = entering.transpose(0, 1, 3, 5, 2, 4).reshape(b, g, nc, n, rep * p)
    y_off = jnp.matmul(Cc, entering_t).reshape(b, g, nc, q, rep, p).transpose(0, 1, 4, 2, 3, 5)
    y = y + y_off * jnp.exp(acs)[..., None]
    return y.transpose(0, 3, 4, 1, 2, 5).reshape(b, t, h, p), final.reshape(b, h, p, n)
