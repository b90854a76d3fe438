"""Per-chunk SSD math shared by the TPU and GPU kernel forms (values, not refs; all fp32).

One chunk of Q tokens for one (batch, head): u [Q, P], l as a column [Q, 1] and a row [1, Q] (the kernels get
both orientations so no in-kernel transpose of a vector is needed), B, C [Q, N], state h [P, N] entering the
chunk. Cumulative sums are matmuls with triangular masks (TPU-friendly; no cumsum primitive needed).

Forward:  y = ((C B^T) * Lm) u + exp(L) * (C h^T);   h_out = exp(L_Q) h + (u * exp(L_Q - L))^T B
with L the inclusive cumsum of l and Lm[i, j] = exp(L_i - L_j) for i >= j, else 0.

Backward (G = dLoss/dh_out, dy = dLoss/dy), derived from the forward above:
    du = ((C B^T) * Lm)^T dy + exp(L_Q - L) * (B G^T)
    Z  = (dy u^T) * Lm
    dC = Z B + exp(L) * (dy h)               dB = Z^T C + exp(L_Q - L) * (u G)
    dh = (exp(L) * dy)^T C + exp(L_Q) G
    dL_i = sum_j (Z * C B^T)_ij - sum_j (Z * C B^T)_ji + exp(L_i) <dy_i, (C h^T)_i> - W_i,
        W_j = exp(L_Q - L_j) <u_j, (B G^T)_j>;  L_Q also receives sum_j W_j + exp(L_Q) <G, h>
    dl = reverse cumsum of dL (L_i = sum_{k <= i} l_k)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def dot(a, b, contract_a: int, contract_b: int):
    """a and b contracted over one dimension each, fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=F32,
                               precision=HIGHEST)


def decays(lcol, lrow):
    """-> Lm [Q, Q], exp(L) [Q, 1], exp(L_Q - L) [Q, 1], L_Q [1, 1]."""
    q = lcol.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    lower = row >= col
    L_col = dot(lower.astype(F32), lcol, 1, 0)                       # [Q, 1] inclusive cumsum
    L_row = dot(lrow, (row <= col).astype(F32), 1, 0)                # [1, Q] the same, as a row
    seg = jnp.where(lower, L_col - L_row, 0.0)
    Lm = jnp.where(lower, jnp.exp(seg), 0.0)
    total = jnp.sum(lrow, axis=1, keepdims=True)                     # [1, 1]
    return Lm, jnp.exp(L_col), jnp.exp(total - L_col), total


def chunk_forward(u, lcol, lrow, B, C, h):
    """-> y [Q, P], h_out [P, N]."""
    Lm, e_in, e_out, total = decays(lcol, lrow)
    scores = dot(C, B, 1, 1) * Lm
    y = dot(scores, u, 1, 0) + e_in * dot(C, h, 1, 1)
    h_out = jnp.exp(total) * h + dot(u * e_out, B, 0, 0)
    return y, h_out


def chunk_state(u, lcol, lrow, B):
    """The state one chunk adds on its own at its end: (u * exp(L_Q - L))^T B  [P, N]."""
    _, _, e_out, _ = decays(lcol, lrow)
    return dot(u * e_out, B, 0, 0)


def chunk_output(u, lcol, lrow, B, C, h):
    """y [Q, P] of a chunk given the state h entering it."""
    Lm, e_in, _, _ = decays(lcol, lrow)
    return dot(dot(C, B, 1, 1) * Lm, u, 1, 0) + e_in * dot(C, h, 1, 1)


def chunk_backward(u, lcol, lrow, B, C, h, dy, G):
    """-> du [Q, P], dl [Q, 1], dB [Q, N], dC [Q, N], dh [P, N] (gradient w.r.t. the entering state)."""
    q = u.shape[0]
    Lm, e_in, e_out, total = decays(lcol, lrow)
    S = dot(C, B, 1, 1)
    BG = dot(B, G, 1, 1)                                             # [Q, P]
    Ch = dot(C, h, 1, 1)                                             # [Q, P]
    du = dot(S * Lm, dy, 0, 0) + e_out * BG
    Z = dot(dy, u, 1, 1) * Lm
    dC = dot(Z, B, 1, 0) + e_in * dot(dy, h, 1, 0)
    dB = dot(Z, C, 0, 0) + e_out * dot(u, G, 1, 0)
    ZS = Z * S
    W = e_out * jnp.sum(u * BG, axis=1, keepdims=True)
    dL = (jnp.sum(ZS, axis=1, keepdims=True) - dot(ZS, jnp.ones((q, 1), F32), 0, 0)
          + e_in * jnp.sum(dy * Ch, axis=1, keepdims=True) - W)
    to_last = jnp.sum(W, axis=0, keepdims=True) + jnp.exp(total) * jnp.sum(G * h, keepdims=True)   # [1, 1]
    row = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    dl = dot((row <= col).astype(F32), dL, 1, 0) + to_last           # reverse cumsum; L_Q feeds every l
    dh = dot(e_in * dy, C, 0, 0) + jnp.exp(total) * G
    return du, dl, dB, dC, dh


def chunk_dstate(lcol, lrow, C, dy):
    """The gradient a chunk's outputs alone send to the state entering it: (exp(L) * dy)^T C  [P, N]."""
    _, e_in, _, _ = decays(lcol, lrow)
    return dot(e_in * dy, C, 0, 0)
