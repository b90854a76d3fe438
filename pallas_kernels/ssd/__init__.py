"""Fused chunked SSD scan (Pallas), forward and backward: the 'pallas' implementation of nemojax.ssd, which
checks shapes, pads to whole chunks, adds the D skip and holds the reference (nemojax/ssd/reference.py).

The kernel form is picked by backend: 'tpu' (sequential chunk axis, VMEM state carry) on TPU and on CPU
(interpret mode, which is how CI checks it), 'gpu' (all-parallel grid + XLA state passing) on GPU.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.kernel import ssd_core

F32 = jnp.float32

__all__ = ["ssd_pallas", "ssd_core", "default_form"]


def default_form(backend: Optional[str] = None) -> tuple[str, bool]:
    """(form, interpret) for a backend: TPU -> compiled TPU form, GPU -> compiled GPU form, else interpret."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "tpu", False
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "tpu", True


def ssd_pallas(x, dt, A, B, C, state0, chunk_size: int, form: Optional[str] = None,
               interpret: Optional[bool] = None):
    """x [b, T, H, P], dt [b, T, H], A [H], B/C [b, T, G, N], state0 [b, H, P, N] fp32, T a multiple of
    chunk_size -> (y [b, T, H, P] fp32 without the D skip, final state [b, H, P, N] fp32)."""
    auto_form, auto_interpret = default_form()
    x32, dt32 = x.astype(F32), dt.astype(F32)
    u = (x32 * dt32[..., None]).transpose(0, 2, 1, 3)                 # [b, H, T, P]
    l = (dt32 * A.astype(F32)).transpose(0, 2, 1)                     # [b, H, T]
    Bh, Ch = B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3)         # [b, G, T, N]
    y, final = ssd_core(u, l, Bh, Ch, state0, chunk_size, form or auto_form,
                        auto_interpret if interpret is None else interpret)
    return y.transpose(0, 2, 1, 3), final
