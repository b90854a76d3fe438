"""Fused chunked SSD scan (Pallas), forward and backward; `ssd_pallas` has nemojax.ssd's signature.

The kernel form is picked by backend: 'tpu' (sequential chunk axis, VMEM state carry) on TPU and on CPU
(interpret mode, which is how CI checks it), 'gpu' (all-parallel grid + XLA state passing) on GPU. The
pure-JAX reference is `reference.ssd_core_reference`; nemojax.ssd.ssd_chunked is the XLA fallback.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.kernel import ssd_core
from pallas_kernels.ssd.reference import ssd_core_reference

F32 = jnp.float32

__all__ = ["ssd_pallas", "ssd_core", "ssd_core_reference", "default_form"]


def default_form(backend: Optional[str] = None) -> tuple[str, bool]:
    """(form, interpret) for a backend: TPU -> compiled TPU form, GPU -> compiled GPU form, else interpret."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "tpu", False
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "tpu", True


def ssd_pallas(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 128, form: Optional[str] = None,
               interpret: Optional[bool] = None):
    """Mamba-2 SSD with nemojax.ssd's contract: x [b, T, H, P], dt [b, T, H] (softplus'd), A [H],
    B/C [b, T, G, N], D [H] or None, initial_state [b, H, P, N] or None -> (y [b, T, H, P] fp32,
    final state [b, H, P, N] fp32). Any T: the tail is padded with dt = 0 (decay 1, no input)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    if dt.shape != (b, t, h) or B.shape != C.shape or B.shape[:2] != (b, t) or A.shape != (h,):
        raise ValueError(f"inconsistent SSD shapes: x {x.shape}, dt {dt.shape}, A {A.shape}, B {B.shape}, "
                         f"C {C.shape}")
    auto_form, auto_interpret = default_form()
    form = form or auto_form
    interpret = auto_interpret if interpret is None else interpret
    q = chunk_size
    pad = (-t) % q
    x32, dt32 = x.astype(F32), dt.astype(F32)
    u = (x32 * dt32[..., None]).transpose(0, 2, 1, 3)                 # [b, H, T, P]
    l = (dt32 * A.astype(F32)).transpose(0, 2, 1)                     # [b, H, T]
    Bh, Ch = B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3)         # [b, G, T, N]
    if pad:
        u = jnp.pad(u, ((0, 0), (0, 0), (0, pad), (0, 0)))
        l = jnp.pad(l, ((0, 0), (0, 0), (0, pad)))
        Bh = jnp.pad(Bh, ((0, 0), (0, 0), (0, pad), (0, 0)))
        Ch = jnp.pad(Ch, ((0, 0), (0, 0), (0, pad), (0, 0)))
    h0 = jnp.zeros((b, h, p, n), F32) if initial_state is None else initial_state.astype(F32)
    y, final = ssd_core(u, l, Bh, Ch, h0, q, form, interpret)
    y = y[:, :, :t].transpose(0, 2, 1, 3)
    if D is not None:
        y = y + D.astype(F32)[:, None] * x32
    return y, final
