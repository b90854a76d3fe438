"""Mamba-2 state-space duality (SSD): one op with named implementations, checked and padded in one place.

Every implementation computes, per batch row and head h (group g = h // (H // G)):

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t (outer) B_t      # state: [P, N]
    y_t     = state_t @ C_t + D_h * x_t                                    # y: [P]

Shapes:
    x      [batch, seq, heads, head_dim]           (P = head_dim)
    dt     [batch, seq, heads]                     already softplus'd (and clamped if the caller wants)
    A      [heads]                                 negative decay rate, A = -exp(A_log)
    B, C   [batch, seq, groups, state]             shared by heads // groups heads each
    D      [heads] or None                         skip connection on the un-dt-scaled x
    state  [batch, heads, head_dim, state]         fp32
All math runs in fp32 whatever the input dtype; y is returned in fp32 (callers cast).

Implementations (IMPLS), each fn(x, dt, A, B, C, state0, **options) -> (y without the D skip, final state):
    naive        reference.py: the recurrence one token at a time (the reference; return_all_states=True gives
                 the state after every token, for speculative rollback)
    associative  xla.py: jax.lax.associative_scan over (decay, increment) pairs; O(T*P*N) memory
    chunked      xla.py: the chunked SSD (matmuls inside chunks, a scan across them); the default
    pallas       pallas_kernels/ssd: the fused chunked kernel (compiled on TPU/GPU, interpreted elsewhere;
                 options form='tpu'|'gpu', interpret=bool)
`step` (reference.py) is the one-token update used by decode.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nemojax.ssd.reference import ssd_naive, step
from nemojax.ssd.xla import ssd_associative, ssd_chunked
from pallas_kernels.ssd import ssd_pallas

Array = jax.Array
F32 = jnp.float32

IMPLS = {"naive": ssd_naive, "associative": ssd_associative, "chunked": ssd_chunked, "pallas": ssd_pallas}
CHUNKED = ("chunked", "pallas")

__all__ = ["ssd", "step", "IMPLS"]


def check_shapes(x: Array, dt: Array, A: Array, B: Array, C: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, seq, heads, head_dim], got shape {x.shape}")
    b, t, h, _ = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [batch, seq, heads] = {(b, t, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads] = {(h,)}, got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
        raise ValueError(f"B and C must both be [batch, seq, groups, state]; got {B.shape} and {C.shape}")
    if h % B.shape[2]:
        raise ValueError(f"heads ({h}) must be divisible by groups ({B.shape[2]})")


def ssd(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Optional[Array] = None,
        initial_state: Optional[Array] = None, *, impl: str = "chunked", chunk_size: int = 128,
        **options) -> tuple[Array, Array]:
    """(y [b, t, h, p] fp32, final state [b, h, p, n] fp32) by the implementation `impl` (IMPLS). The chunked
    implementations see a sequence padded to a whole number of chunks with dt = 0 (decay 1, no input), which
    leaves the final state unchanged; y is cropped back. options go to the implementation (naive:
    return_all_states=True returns the state after every token [b, t, h, p, n] instead of the final one)."""
    check_shapes(x, dt, A, B, C)
    if impl not in IMPLS:
        raise ValueError(f"unknown ssd impl {impl!r}; expected one of {sorted(IMPLS)}")
    if options.get("return_all_states") and impl != "naive":
        raise ValueError(f"return_all_states is implemented by impl='naive' only, not {impl!r}")
    b, t, h, p = x.shape
    n = B.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, h, p, n), F32)
    elif initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be [batch, heads, head_dim, state] = {(b, h, p, n)}, "
                         f"got {initial_state.shape}")
    inputs = (x, dt, B, C)
    if impl in CHUNKED:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        q = chunk_size if impl == "pallas" else min(chunk_size, max(t, 1))   # short sequences: one chunk
        pad = (-t) % q
        inputs = tuple(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in inputs)
        options["chunk_size"] = q
    y, final = IMPLS[impl](inputs[0], inputs[1], A, inputs[2], inputs[3], initial_state.astype(F32), **options)
    y = y[:, :t]
    return (y if D is None else y + D.astype(F32)[:, None] * x.astype(F32)), final
