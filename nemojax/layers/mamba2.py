"""Mamba-2 mixer (architecture.md §3).

HF stores one fused `in_proj` [2I + 2GN + H, D] split as [z | x | B | C | dt] and one depthwise `conv1d` over
[x | B | C]. Here each component is its own parameter (in_proj_z, in_proj_x, ...; conv_x, conv_B, conv_C) so
that tensor parallelism can shard x/z over heads and B/C over groups without a shard straddling two
components. The converter (convert/hf.py) splits and re-joins the fused HF tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax import ssd as ssd_lib
from nemojax.config import ModelConfig
from nemojax.layers.common import dtypes, linear, output_init_std
from nemojax.layers.norm import GatedGroupRMSNorm

F32 = jnp.float32


class MambaState(NamedTuple):
    """Recurrent state of one Mamba layer.

    conv: last (conv_kernel - 1) pre-conv inputs of x, B and C: [batch, K-1, I], [batch, K-1, GN], [batch, K-1, GN]
    ssm:  [batch, heads, head_dim, state] fp32
    """
    conv_x: jax.Array
    conv_B: jax.Array
    conv_C: jax.Array
    ssm: jax.Array


class CausalDepthwiseConv(nnx.Module):
    """Causal depthwise conv over time, kernel K: out[t] = b + sum_k w[k] * in[t - (K-1) + k].

    weight [K, channels] (w[K-1] multiplies the current token), bias [channels].
    """

    def __init__(self, channels: int, kernel: int, use_bias: bool, param_dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(kernel)  # kaiming_uniform(a=sqrt(5)) with fan_in = kernel (depthwise)
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (kernel, channels), param_dtype, -bound, bound))
        self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound, bound))
                     if use_bias else None)
        self.kernel = kernel

    def __call__(self, x: jax.Array, prefix: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
        """x [batch, seq, channels] -> (fp32 output [batch, seq, channels], new prefix [batch, K-1, channels]).

        prefix holds the K-1 inputs before x (zeros at the start of a sequence).
        """
        b, t, c = x.shape
        k = self.kernel
        if prefix is None:
            prefix = jnp.zeros((b, k - 1, c), x.dtype)
        xp = jnp.concatenate([prefix.astype(x.dtype), x], axis=1).astype(F32)     # [b, t+K-1, c]
        w = self.weight[...].astype(F32)
        out = sum(w[i] * xp[:, i:i + t] for i in range(k))
        if self.bias is not None:
            out = out + self.bias[...].astype(F32)
        return out, xp[:, t:].astype(x.dtype) if k > 1 else prefix


class Mamba2Mixer(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden] (and optionally the final MambaState)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        h, g, n = cfg.mamba_num_heads, cfg.n_groups, cfg.ssm_state_size
        d, inner = cfg.hidden_size, cfg.mamba_inner
        _, param_dtype = dtypes(cfg)
        bias = cfg.mamba_proj_bias
        self.in_proj_z = linear(cfg, d, inner, rngs, bias=bias)
        self.in_proj_x = linear(cfg, d, inner, rngs, bias=bias)
        self.in_proj_B = linear(cfg, d, g * n, rngs, bias=bias)
        self.in_proj_C = linear(cfg, d, g * n, rngs, bias=bias)
        self.in_proj_dt = linear(cfg, d, h, rngs, bias=bias)
        self.conv_x = CausalDepthwiseConv(inner, cfg.conv_kernel, cfg.use_conv_bias, param_dtype, rngs)
        self.conv_B = CausalDepthwiseConv(g * n, cfg.conv_kernel, cfg.use_conv_bias, param_dtype, rngs)
        self.conv_C = CausalDepthwiseConv(g * n, cfg.conv_kernel, cfg.use_conv_bias, param_dtype, rngs)
        # S4D-real init: A = -U(1, 16); dt log-uniform in [time_step_min, time_step_max], stored as
        # inverse-softplus so softplus(dt_bias) = dt; D = 1 (quant_training.md §7).
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), F32, 1.0, 16.0)).astype(param_dtype))
        log_dt = jax.random.uniform(rngs.params(), (h,), F32, math.log(cfg.time_step_min), math.log(cfg.time_step_max))
        dt = jnp.maximum(jnp.exp(log_dt), cfg.time_step_floor)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))
        self.D = nnx.Param(jnp.ones((h,), param_dtype))
        self.norm = GatedGroupRMSNorm(inner, g, cfg.layer_norm_epsilon, param_dtype)
        self.out_proj = linear(cfg, inner, d, rngs, bias=bias, std=output_init_std(cfg))

    def discretize_dt(self, dt_raw: jax.Array, prefill: bool) -> jax.Array:
        """dt = softplus(dt_raw + dt_bias) in fp32, limited by time_step_limit; with dt_clamp='hf' also
        floored at time_step_min on multi-token forwards, as transformers 5.x does."""
        cfg = self.cfg
        dt = jax.nn.softplus(dt_raw.astype(F32) + self.dt_bias[...].astype(F32))
        lo, hi = cfg.time_step_limit
        if prefill and cfg.dt_clamp == "hf":
            lo = max(lo, cfg.time_step_min)
        if lo > 0.0 or hi != math.inf:
            dt = jnp.clip(dt, lo, hi)
        return dt

    def __call__(self, x: jax.Array, attention_mask: Optional[jax.Array] = None,
                 state: Optional[MambaState] = None, return_state: bool = False, all_states: bool = False):
        """x [batch, seq, hidden]; attention_mask [batch, seq] (1 = real token) zeroes padded positions
        before the projections and after the conv, as HF does. state continues a previous segment.

        all_states=True (with return_state) returns, instead of the final state, the states after every
        position: conv prefixes [batch, seq, K-1, ch] and ssm [batch, seq, heads, head_dim, state] (for
        rolling back speculative tokens)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
        mask = None if attention_mask is None else attention_mask.astype(x.dtype)[:, :, None]
        if mask is not None:
            x = x * mask
        z = self.in_proj_z(x)
        xs, new_cx = self.conv_x(self.in_proj_x(x), None if state is None else state.conv_x)
        B, new_cB = self.conv_B(self.in_proj_B(x), None if state is None else state.conv_B)
        C, new_cC = self.conv_C(self.in_proj_C(x), None if state is None else state.conv_C)
        xs, B, C = jax.nn.silu(xs), jax.nn.silu(B), jax.nn.silu(C)
        if mask is not None:
            m32 = mask.astype(F32)
            xs, B, C = xs * m32, B * m32, C * m32
        # all_states marks a speculative verification pass: decode semantics, so no HF prefill-only clamp.
        dt = self.discretize_dt(self.in_proj_dt(x), prefill=t > 1 and not all_states)
        A = -jnp.exp(self.A_log[...].astype(F32))
        D = self.D[...].astype(F32)
        x4, B4, C4 = xs.reshape(b, t, h, p), B.reshape(b, t, g, n), C.reshape(b, t, g, n)
        init = None if state is None else state.ssm
        if all_states:
            y, ssm_state = ssd_lib.ssd_naive(x4, dt, A, B4, C4, D, init, return_all_states=True)
        elif t == 1 and state is not None:      # decode: the one-token recurrence, no chunking
            y, ssm_state = ssd_lib.ssd_step(state.ssm, x4[:, 0], dt[:, 0], A, B4[:, 0], C4[:, 0], D)
            y = y[:, None]
        else:
            y, ssm_state = ssd_lib.ssd(x4, dt, A, B4, C4, D=D, initial_state=init, chunk_size=cfg.chunk_size,
                                       impl=cfg.ssd_impl)
        y = self.norm(y.reshape(b, t, h * p), z)                          # fp32
        out = self.out_proj(y.astype(dtypes(cfg)[0]))
        if not return_state:
            return out
        if all_states:
            windows = [self._prefix_windows(c, proj(x), state_c) for c, proj, state_c in (
                (self.conv_x, self.in_proj_x, None if state is None else state.conv_x),
                (self.conv_B, self.in_proj_B, None if state is None else state.conv_B),
                (self.conv_C, self.in_proj_C, None if state is None else state.conv_C))]
            return out, MambaState(*windows, ssm_state)
        return out, MambaState(new_cx, new_cB, new_cC, ssm_state)

    @staticmethod
    def _prefix_windows(conv: "CausalDepthwiseConv", inputs: jax.Array, prefix: Optional[jax.Array]) -> jax.Array:
        """Conv prefix after each position: [batch, seq, K-1, channels]."""
        b, t, c = inputs.shape
        k = conv.kernel - 1
        if prefix is None:
            prefix = jnp.zeros((b, k, c), inputs.dtype)
        full = jnp.concatenate([prefix.astype(inputs.dtype), inputs], axis=1)          # [b, k + t, c]
        return jnp.stack([full[:, i + 1:i + 1 + k] for i in range(t)], axis=1)
