"""Per-chunk SSD math shared by the TPU and GPU kernel forms (values, not refs; all fp32).

One chunk of Q tokens for one (batch, head): u [Q, P], the log decays l as a column [Q, 1] and a row [1, Q]
(the kernels get both orientations, so no vector is transposed in a kernel), B, C [Q, N], state h [P, N] entering
the chunk. With l <= 0 every decay exponent is a sum of same-sign terms, and each is taken directly over its own
terms, never as a difference of two cumulative sums (which loses precision once |sum l| over a chunk is large):

    seg[i, j] = sum_{j<k<=i} l_k   (a prefix sum down the columns of [l_i if i > j])
    Lin_i  = sum_{k<=i} l_k        Lout_j = sum_{k>j} l_k        total = sum_k l_k

Forward:  y = ((C B^T) * Lm) u + exp(Lin) * (C h^T);   h_out = exp(total) h + (u * exp(Lout))^T B,
with Lm = exp(seg) on and below the diagonal, else 0.

Backward (G = dLoss/dh_out, dy = dLoss/dy; Z = (dy u^T) * Lm, S = C B^T):
    du = (S * Lm)^T dy + exp(Lout) * (B G^T)          dh = (exp(Lin) * dy)^T C + exp(total) G
    dC = Z B + exp(Lin) * (dy h)                       dB = Z^T C + exp(Lout) * (u G)
    dl_k = sum_{i>=k, j<k} (Z * S)_ij + sum_{i>=k} E_i + sum_{j<k} W_j + exp(total) <G, h>
with E_i = exp(Lin_i) <dy_i, (C h^T)_i> and W_j = exp(Lout_j) <u_j, (B G^T)_j>: again each a direct sum.

`cumsum(x, axis)` is the inclusive prefix sum the form's compiler supports (Mosaic TPU: rotations; Triton:
its scan).
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


def _grid(q: int):
    return jax.lax.broadcasted_iota(jnp.int32, (q, q), 0), jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)


def as_row(col):
    """[Q, 1] -> [1, Q] through a masked reduction (no transpose)."""
    row, colx = _grid(col.shape[0])
    return jnp.sum(jnp.where(row == colx, col, 0.0), axis=0, keepdims=True)


def as_col(row_vec):
    """[1, Q] -> [Q, 1] through a masked reduction (no transpose)."""
    row, col = _grid(row_vec.shape[1])
    return jnp.sum(jnp.where(row == col, row_vec, 0.0), axis=1, keepdims=True)


def decays(lcol, lrow, cumsum):
    """-> Lm [Q, Q], exp(Lin) [Q, 1], exp(Lout) [Q, 1], total [1, 1]."""
    row, col = _grid(lcol.shape[0])
    seg = cumsum(jnp.where(row > col, lcol, 0.0), 0)                 # [i, j] = sum_{j<k<=i} l_k
    Lm = jnp.where(row >= col, jnp.exp(seg), 0.0)
    lin = jnp.sum(jnp.where(col <= row, lrow, 0.0), axis=1, keepdims=True)
    lout = jnp.sum(jnp.where(col > row, lrow, 0.0), axis=1, keepdims=True)
    return Lm, jnp.exp(lin), jnp.exp(lout), jnp.sum(lrow, axis=1, keepdims=True)


def chunk_forward(u, lcol, lrow, B, C, h, cumsum):
    """-> y [Q, P], h_out [P, N]."""
    Lm, e_in, e_out, total = decays(lcol, lrow, cumsum)
    scores = dot(C, B, 1, 1) * Lm
    y = dot(scores, u, 1, 0) + e_in * dot(C, h, 1, 1)
    h_out = jnp.exp(total) * h + dot(u * e_out, B, 0, 0)
    return y, h_out


def chunk_state(u, lcol, lrow, B, cumsum):
    """The state one chunk adds on its own at its end: (u * exp(Lout))^T B  [P, N]."""
    _, _, e_out, _ = decays(lcol, lrow, cumsum)
    return dot(u * e_out, B, 0, 0)


def chunk_output(u, lcol, lrow, B, C, h, cumsum):
    """y [Q, P] of a chunk given the state h entering it."""
    Lm, e_in, _, _ = decays(lcol, lrow, cumsum)
    return dot(dot(C, B, 1, 1) * Lm, u, 1, 0) + e_in * dot(C, h, 1, 1)


def chunk_backward(u, lcol, lrow, B, C, h, dy, G, cumsum):
    """-> du [Q, P], dl [Q, 1], dB [Q, N], dC [Q, N], dh [P, N] (gradient w.r.t. the entering state)."""
    row, col = _grid(u.shape[0])
    Lm, e_in, e_out, total = decays(lcol, lrow, cumsum)
    S = dot(C, B, 1, 1)
    BG = dot(B, G, 1, 1)                                             # [Q, P]
    Ch = dot(C, h, 1, 1)                                             # [Q, P]
    du = dot(S * Lm, dy, 0, 0) + e_out * BG
    Z = dot(dy, u, 1, 1) * Lm
    dC = dot(Z, B, 1, 0) + e_in * dot(dy, h, 1, 0)
    dB = dot(Z, C, 0, 0) + e_out * dot(u, G, 1, 0)
    ZS = Z * S
    before = cumsum(ZS, 1) - ZS                                      # [i, k] = sum_{j<k} ZS_ij
    rect = as_col(jnp.sum(jnp.where(row >= col, before, 0.0), axis=0, keepdims=True))     # sum over i >= k
    E = as_row(e_in * jnp.sum(dy * Ch, axis=1, keepdims=True))
    W = as_row(e_out * jnp.sum(u * BG, axis=1, keepdims=True))
    dl = (rect + jnp.sum(jnp.where(col >= row, E, 0.0), axis=1, keepdims=True)
          + jnp.sum(jnp.where(col < row, W, 0.0), axis=1, keepdims=True)
          + jnp.exp(total) * jnp.sum(G * h, keepdims=True))
    dh = dot(e_in * dy, C, 0, 0) + jnp.exp(total) * G
    return du, dl, dB, dC, dh


def chunk_dstate(lcol, lrow, C, dy, cumsum):
    """The gradient a chunk's outputs alone send to the state entering it: (exp(Lin) * dy)^T C  [P, N]."""
    _, e_in, _, _ = decays(lcol, lrow, cumsum)
    return dot(e_in * dy, C, 0, 0)
