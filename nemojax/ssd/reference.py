"""The SSD reference: the recurrence one token at a time (every other implementation is tested against it),
and the one-token update that decode uses. Contracts in nemojax/ssd/__init__.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def ssd_naive(x, dt, A, B, C, state0, return_all_states: bool = False):
    """(y [b,t,h,p] without the D skip, final state [b,h,p,n]), or with return_all_states the state after every
    token [b,t,h,p,n] in place of the final one."""
    rep, A = x.shape[2] // B.shape[2], A.astype(F32)

    def one_token(state, inputs):
        x_t, dt_t, B_t, C_t = inputs                      # [b,h,p], [b,h], [b,g,n], [b,g,n]
        B_h = jnp.repeat(B_t, rep, axis=1)                # [b,h,n]; fine for the reference
        C_h = jnp.repeat(C_t, rep, axis=1)
        state = jnp.exp(dt_t * A)[:, :, None, None] * state + (dt_t[:, :, None] * x_t)[..., None] * B_h[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_h)
        return state, (y_t, state) if return_all_states else y_t

    xs = tuple(jnp.moveaxis(a.astype(F32), 1, 0) for a in (x, dt, B, C))
    final, outs = jax.lax.scan(one_token, state0, xs)
    if return_all_states:
        ys, states = outs
        return jnp.moveaxis(ys, 0, 1), jnp.moveaxis(states, 0, 1)
    return jnp.moveaxis(outs, 0, 1), final


def step(state, x, dt, A, B, C, D=None):
    """One decode token. state [b,h,p,n], x [b,h,p], dt [b,h], B/C [b,g,n] -> (y [b,h,p] fp32, new state)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    if state.shape != (b, h, p, n):
        raise ValueError(f"state must be [batch, heads, head_dim, state] = {(b, h, p, n)}, got {state.shape}")
    x32 = x.astype(F32)
    decay = jnp.exp(dt.astype(F32) * A.astype(F32)).reshape(b, g, h // g)
    st = state.astype(F32).reshape(b, g, h // g, p, n)
    dx = (dt.astype(F32)[..., None] * x32).reshape(b, g, h // g, p)
    st = decay[..., None, None] * st + dx[..., None] * B.astype(F32)[:, :, None, None, :]
    y = jnp.einsum("bgrpn,bgn->bgrp", st, C.astype(F32)).reshape(b, h, p)
    return (y if D is None else y + D.astype(F32)[:, None] * x32), st.reshape(b, h, p, n)
