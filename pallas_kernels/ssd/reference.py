"""Pure-JAX reference of the SSD kernels' core contract (a per-token scan; the kernels must match it).

    ssd_core(u, l, B, C, h0) -> (y, h_T), per batch row and head h (group g = h // (H // G)):
        h_t = exp(l_t) * h_{t-1} + u_t (outer) B_t          h: [P, N] fp32
        y_t = h_t @ C_t                                       y: [P]

    u  [batch, heads, seq, P]   dt-scaled input (dt * x)
    l  [batch, heads, seq]      log decay (dt * A)
    B, C [batch, groups, seq, N]
    h0 [batch, heads, P, N]     fp32 initial state
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def ssd_core_reference(u, l, B, C, h0):
    b, h, t, p = u.shape
    g = B.shape[1]
    rep = h // g
    Bh = jnp.repeat(B.astype(F32), rep, axis=1)            # the reference may repeat; the kernels do not
    Ch = jnp.repeat(C.astype(F32), rep, axis=1)

    def step(state, inputs):
        u_t, l_t, b_t, c_t = inputs                          # [b,h,p], [b,h], [b,h,n], [b,h,n]
        state = jnp.exp(l_t)[..., None, None] * state + u_t[..., :, None] * b_t[..., None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_t)

    xs = (jnp.moveaxis(u.astype(F32), 2, 0), jnp.moveaxis(l.astype(F32), 2, 0), jnp.moveaxis(Bh, 2, 0),
          jnp.moveaxis(Ch, 2, 0))
    final, ys = jax.lax.scan(step, h0.astype(F32), xs)
    return jnp.moveaxis(ys, 0, 2), final
