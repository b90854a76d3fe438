"""Fused chunked SSD scan in Pallas: forward and backward, in two forms over the same chunk math.

Contract, per batch row and head h (group g = h // (H // G)); the reference is nemojax/ssd/reference.py:
    h_t = exp(l_t) * h_{t-1} + u_t (outer) B_t  (h: [P, N] fp32);  y_t = h_t @ C_t
with u = dt * x (dt-scaled input) and l = dt * A (log decay).
Layouts (head-major so every block is a 2-D tile):
    u [b, H, T, P], l as lcol [b, H, T, 1] and lrow [b, H, 1, T], B/C [b, G, T, N], states [b, H, P, N].
Grouped B/C are read through the index map (head h reads group h // (H // G)): never repeated in memory.

TPU form (`tpu_forward`, `tpu_backward`): grid (batch, head, chunk) with the chunk axis "arbitrary"
(sequential); the [P, N] fp32 state (forward) or its gradient (backward, chunks visited in reverse) lives in a
VMEM scratch across chunks. The forward also writes the state entering each chunk ([b, H, nc, P, N], what the
backward needs; per-token states are never stored, the backward recomputes the chunk internals).

GPU form (`parallel_forward`, `parallel_backward`): every grid axis parallel (GPU programs run concurrently,
so no carry across programs): one kernel computes each chunk's own end state, an XLA scan over chunks passes
states (nc x P x N, small), a second kernel computes outputs. The backward mirrors it with a reverse scan of
state gradients. Both forms run under interpret=True on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.ssd import chunk_math as cm

F32 = jnp.float32


def _roll_cumsum(x, axis: int):
    """Inclusive prefix sum along `axis` in log2(size) steps of rotate-and-add (Mosaic TPU has no cumsum)."""
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    shift = 1
    while shift < x.shape[axis]:
        x = x + jnp.where(idx >= shift, pltpu.roll(x, shift, axis), 0.0)
        shift *= 2
    return x


def _gpu_cumsum(x, axis: int):
    return jnp.cumsum(x, axis=axis)


def _tpu_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _scratch(shape):
    return pltpu.VMEM(shape, F32)


def _cost(b, h, t, p, n, q, outputs: int, backward: bool = False) -> pl.CostEstimate:
    """Per (batch, head, chunk): the chunk matmuls (C B^T, scores u, C h^T, u^T B; the backward about 2.5x
    that), the exponentials of the Q x Q decays, inputs u, l, B, C and `outputs` [T, P]-sized fp32 outputs."""
    chunks = b * h * (t // q)
    flops = 2 * chunks * (q * q * n + q * q * p + 2 * q * p * n) * (2.5 if backward else 1.0)
    return pl.CostEstimate(flops=int(flops), transcendentals=chunks * (q * q + 3 * q),
                           bytes_accessed=4 * b * h * t * (p + 1 + 2 * n + outputs * p))


def _specs(q, p, n, rep, reverse_nc=None):
    """BlockSpecs over grid (b, h, c); reverse_nc=nc visits chunks last to first."""
    def chunk(c):
        return c if reverse_nc is None else reverse_nc - 1 - c

    return {
        "u": pl.BlockSpec((None, None, q, p), lambda b, h, c: (b, h, chunk(c), 0)),
        "lcol": pl.BlockSpec((None, None, q, 1), lambda b, h, c: (b, h, chunk(c), 0)),
        "lrow": pl.BlockSpec((None, None, 1, q), lambda b, h, c: (b, h, 0, chunk(c))),
        "bc": pl.BlockSpec((None, None, q, n), lambda b, h, c: (b, h // rep, chunk(c), 0)),
        "bc_head": pl.BlockSpec((None, None, q, n), lambda b, h, c: (b, h, chunk(c), 0)),
        "state": pl.BlockSpec((None, None, p, n), lambda b, h, c: (b, h, 0, 0)),
        "chunk_state": pl.BlockSpec((None, None, None, p, n), lambda b, h, c: (b, h, chunk(c), 0, 0)),
    }


def _dims(u, B):
    b, h, t, p = u.shape
    g, n = B.shape[1], B.shape[3]
    return b, h, t, p, g, n


def _chunk_grads(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, hin_ref, dy_ref, G, du_ref, dl_ref, db_ref, dc_ref,
                 cumsum):
    """Backward of one chunk (both forms): writes du, dl, dB, dC; returns the entering state's gradient."""
    du, dl, dB, dC, dh = cm.chunk_backward(
        u_ref[...].astype(F32), lcol_ref[...].astype(F32), lrow_ref[...].astype(F32), b_ref[...].astype(F32),
        c_ref[...].astype(F32), hin_ref[...], dy_ref[...].astype(F32), G, cumsum)
    du_ref[...] = du
    dl_ref[...] = dl
    db_ref[...] = dB
    dc_ref[...] = dC
    return dh


# ----------------------------------------------------------------------------------------------- TPU form
def _tpu_forward_kernel(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, h0_ref, y_ref, hT_ref, hin_ref, h_scr):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        h_scr[...] = h0_ref[...].astype(F32)

    h = h_scr[...]
    hin_ref[...] = h
    y, h_out = cm.chunk_forward(u_ref[...].astype(F32), lcol_ref[...].astype(F32), lrow_ref[...].astype(F32),
                                b_ref[...].astype(F32), c_ref[...].astype(F32), h, _roll_cumsum)
    y_ref[...] = y.astype(y_ref.dtype)
    h_scr[...] = h_out

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        hT_ref[...] = h_out


def tpu_forward(u, lcol, lrow, B, C, h0, chunk: int, interpret: bool):
    """-> y [b, H, T, P] fp32, final state [b, H, P, N], entering states [b, H, nc, P, N]."""
    b, h, t, p, g, n = _dims(u, B)
    nc = t // chunk
    s = _specs(chunk, p, n, h // g)
    return pl.pallas_call(
        _tpu_forward_kernel,
        out_shape=(jax.ShapeDtypeStruct((b, h, t, p), F32), jax.ShapeDtypeStruct((b, h, p, n), F32),
                   jax.ShapeDtypeStruct((b, h, nc, p, n), F32)),
        grid=(b, h, nc),
        in_specs=[s["u"], s["lcol"], s["lrow"], s["bc"], s["bc"], s["state"]],
        out_specs=(s["u"], s["state"], s["chunk_state"]),
        scratch_shapes=[_scratch((p, n))],
        compiler_params=_tpu_params("parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(b, h, t, p, n, chunk, outputs=1),
        interpret=interpret,
    )(u, lcol, lrow, B, C, h0)


def _tpu_backward_kernel(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, hin_ref, dy_ref, dhT_ref,
                         du_ref, dl_ref, db_ref, dc_ref, dh0_ref, g_scr):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        g_scr[...] = dhT_ref[...].astype(F32)

    dh = _chunk_grads(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, hin_ref, dy_ref, g_scr[...],
                      du_ref, dl_ref, db_ref, dc_ref, _roll_cumsum)
    g_scr[...] = dh

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = dh


def tpu_backward(u, lcol, lrow, B, C, h_in, dy, dhT, chunk: int, interpret: bool):
    """-> du [b,H,T,P], dl [b,H,T,1], dB and dC per head [b,H,T,N], dh0 [b,H,P,N] (all fp32)."""
    b, h, t, p, g, n = _dims(u, B)
    nc = t // chunk
    s = _specs(chunk, p, n, h // g, reverse_nc=nc)
    shapes = [(b, h, t, p), (b, h, t, 1), (b, h, t, n), (b, h, t, n), (b, h, p, n)]
    return pl.pallas_call(
        _tpu_backward_kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(sh, F32) for sh in shapes),
        grid=(b, h, nc),
        in_specs=[s["u"], s["lcol"], s["lrow"], s["bc"], s["bc"], s["chunk_state"], s["u"], s["state"]],
        out_specs=(s["u"], s["lcol"], s["bc_head"], s["bc_head"], s["state"]),
        scratch_shapes=[_scratch((p, n))],
        compiler_params=_tpu_params("parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(b, h, t, p, n, chunk, outputs=3, backward=True),
        interpret=interpret,
    )(u, lcol, lrow, B, C, h_in, dy, dhT)


# ----------------------------------------------------------------------------------------------- GPU form
def _state_kernel(u_ref, lcol_ref, lrow_ref, b_ref, s_ref):
    s_ref[...] = cm.chunk_state(u_ref[...].astype(F32), lcol_ref[...].astype(F32), lrow_ref[...].astype(F32),
                                b_ref[...].astype(F32), _gpu_cumsum)


def _output_kernel(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, hin_ref, y_ref):
    y_ref[...] = cm.chunk_output(u_ref[...].astype(F32), lcol_ref[...].astype(F32), lrow_ref[...].astype(F32),
                                 b_ref[...].astype(F32), c_ref[...].astype(F32), hin_ref[...], _gpu_cumsum)


def _dstate_kernel(lcol_ref, lrow_ref, c_ref, dy_ref, d_ref):
    d_ref[...] = cm.chunk_dstate(lcol_ref[...].astype(F32), lrow_ref[...].astype(F32), c_ref[...].astype(F32),
                                 dy_ref[...].astype(F32), _gpu_cumsum)


def _chunk_backward_kernel(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, hin_ref, dy_ref, g_ref,
                           du_ref, dl_ref, db_ref, dc_ref):
    _chunk_grads(u_ref, lcol_ref, lrow_ref, b_ref, c_ref, hin_ref, dy_ref, g_ref[...], du_ref, dl_ref, db_ref, dc_ref,
                 _gpu_cumsum)


def _parallel_call(kernel, out_shapes, in_specs, out_specs, grid, interpret, cost):
    """A Triton kernel (4 warps, 2 stages) with every grid axis parallel."""
    return pl.pallas_call(kernel, out_shape=out_shapes, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=2),
                          cost_estimate=cost, interpret=interpret)


def _pass_across_chunks(init, lrow, own, reverse: bool = False):
    """The inter-chunk recurrence in XLA: carry_next = exp(chunk log decay) * carry + own[chunk], over the chunk
    axis of own [b, H, nc, p, n] (chunk states forward; reversed, state gradients). lrow [b, H, T] holds the
    per-token log decays. Returns (final carry, the carry each chunk receives [b, H, nc, p, n])."""
    b, h, nc = own.shape[:3]
    decay = jnp.exp(jnp.sum(lrow.reshape(b, h, nc, -1), axis=-1))     # [b, H, nc] decay across each chunk

    def step(carry, xs):
        d, new = xs
        return d[..., None, None] * carry + new, carry

    final, received = jax.lax.scan(step, init.astype(F32), (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(own, 2, 0)),
                                   reverse=reverse)
    return final, jnp.moveaxis(received, 0, 2)


def _pad_head_dim(per_token, state):
    """Zero-pads head_dim (P) of a per-token array [b, H, T, P] and a state [b, H, P, N] to a power of two, as
    Triton needs power-of-two blocks (head_dim 80 -> 128); zero columns change no other output."""
    pad = (1 << (per_token.shape[-1] - 1).bit_length()) - per_token.shape[-1]
    return (jnp.pad(per_token, ((0, 0), (0, 0), (0, 0), (0, pad))), jnp.pad(state, ((0, 0), (0, 0), (0, pad), (0, 0))))


def parallel_forward(u, lcol, lrow, B, C, h0, chunk: int, interpret: bool):
    """Same results as tpu_forward, with no sequential grid axis."""
    p_in = u.shape[-1]
    u, h0 = _pad_head_dim(u, h0)
    b, h, t, p, g, n = _dims(u, B)
    nc = t // chunk
    s = _specs(chunk, p, n, h // g)
    own = _parallel_call(_state_kernel, jax.ShapeDtypeStruct((b, h, nc, p, n), F32),
                         [s["u"], s["lcol"], s["lrow"], s["bc"]], s["chunk_state"], (b, h, nc), interpret,
                         _cost(b, h, t, p, n, chunk, outputs=0))(u, lcol, lrow, B)
    final, entering = _pass_across_chunks(h0, lrow, own)
    y = _parallel_call(_output_kernel, jax.ShapeDtypeStruct((b, h, t, p), F32),
                       [s["u"], s["lcol"], s["lrow"], s["bc"], s["bc"], s["chunk_state"]], s["u"], (b, h, nc),
                       interpret, _cost(b, h, t, p, n, chunk, outputs=1))(u, lcol, lrow, B, C, entering)
    return y[..., :p_in], final[..., :p_in, :], entering[..., :p_in, :]


def parallel_backward(u, lcol, lrow, B, C, h_in, dy, dhT, chunk: int, interpret: bool):
    """Same results as tpu_backward: chunk state-gradients in parallel, a reverse XLA scan, then chunks."""
    p_in = u.shape[-1]
    (u, dhT), (dy, _) = _pad_head_dim(u, dhT), _pad_head_dim(dy, dhT)
    h_in = jnp.pad(h_in, ((0, 0), (0, 0), (0, 0), (0, u.shape[-1] - p_in), (0, 0)))       # [b, H, nc, P, N]
    b, h, t, p, g, n = _dims(u, B)
    nc = t // chunk
    s = _specs(chunk, p, n, h // g)
    own = _parallel_call(_dstate_kernel, jax.ShapeDtypeStruct((b, h, nc, p, n), F32),
                         [s["lcol"], s["lrow"], s["bc"], s["u"]], s["chunk_state"], (b, h, nc), interpret,
                         _cost(b, h, t, p, n, chunk, outputs=0))(lcol, lrow, C, dy)
    # carried backwards: the gradient w.r.t. the state leaving each chunk
    dh0, leaving = _pass_across_chunks(dhT, lrow, own, reverse=True)
    shapes = [(b, h, t, p), (b, h, t, 1), (b, h, t, n), (b, h, t, n)]
    du, dl, dB, dC = _parallel_call(
        _chunk_backward_kernel, tuple(jax.ShapeDtypeStruct(sh, F32) for sh in shapes),
        [s["u"], s["lcol"], s["lrow"], s["bc"], s["bc"], s["chunk_state"], s["u"], s["chunk_state"]],
        (s["u"], s["lcol"], s["bc_head"], s["bc_head"]), (b, h, nc), interpret,
        _cost(b, h, t, p, n, chunk, outputs=3, backward=True))(u, lcol, lrow, B, C, h_in, dy, leaving)
    return du[..., :p_in], dl, dB, dC, dh0[..., :p_in, :]


FORMS = {"tpu": (tpu_forward, tpu_backward), "gpu": (parallel_forward, parallel_backward)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def ssd_core(u, l, B, C, h0, chunk: int, form: str, interpret: bool):
    """u [b,H,T,P], l [b,H,T], B/C [b,G,T,N], h0 [b,H,P,N] with T % chunk == 0 -> (y fp32, final state)."""
    y, final, _ = _forward(u, l, B, C, h0, chunk, form, interpret)
    return y, final


def _orient(l):
    return l[..., None], l[:, :, None, :]


def _forward(u, l, B, C, h0, chunk, form, interpret):
    lcol, lrow = _orient(l.astype(F32))
    return FORMS[form][0](u, lcol, lrow, B, C, h0.astype(F32), chunk, interpret)


def _ssd_core_fwd(u, l, B, C, h0, chunk, form, interpret):
    y, final, entering = _forward(u, l, B, C, h0, chunk, form, interpret)
    return (y, final), (u, l, B, C, entering, h0)


def _ssd_core_bwd(chunk, form, interpret, residuals, grads):
    u, l, B, C, entering, h0 = residuals
    dy, dhT = grads
    lcol, lrow = _orient(l.astype(F32))
    du, dl, dB, dC, dh0 = FORMS[form][1](u, lcol, lrow, B, C, entering, dy.astype(F32), dhT.astype(F32), chunk,
                                         interpret)
    b, h, t, _ = u.shape
    g, n = B.shape[1], B.shape[3]

    def per_group(d):                       # per-head gradients summed over the heads sharing a group
        return d.reshape(b, g, h // g, t, n).sum(axis=2).astype(B.dtype)

    return (du.astype(u.dtype), dl[..., 0].astype(l.dtype), per_group(dB), per_group(dC), dh0.astype(h0.dtype))


ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)
