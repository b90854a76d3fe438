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

from nemojax import ssd
from nemojax.config import ModelConfig
from nemojax.layers.common import Mode, channel_stat, linear, output_init_std, param, record
from nemojax.layers.norm import GatedGroupRMSNorm

F32 = jnp.float32


class MambaState(NamedTuple):
    """Inference cache of one Mamba layer: the last (conv_kernel - 1) pre-conv inputs of x, B and C
    ([batch, K-1, I], [batch, K-1, GN], [batch, K-1, GN]) and the fp32 SSM state [batch, heads, head_dim, state].
    A VERIFY pass returns every array with a position axis after batch: the state after each new token."""
    conv_x: jax.Array
    conv_B: jax.Array
    conv_C: jax.Array
    ssm: jax.Array

    LOGICAL_AXES = {"conv_x": ("batch", "conv_kernel", "mamba_heads"),
                    "conv_B": ("batch", "conv_kernel", "ssm_groups"), "conv_C": ("batch", "conv_kernel", "ssm_groups"),
                    "ssm": ("batch", "mamba_heads", None, None)}

    def rewind(self, pos, index: Optional[jax.Array] = None) -> "MambaState":
        """The state after new token `index` of a VERIFY pass (a recurrent state cannot go back further)."""
        if index is None:
            raise ValueError("a Mamba state can only be rewound to a position kept by a VERIFY pass")
        return jax.tree.map(lambda s: jnp.take(s, index, axis=1), self)


class CausalDepthwiseConv(nnx.Module):
    """Causal depthwise conv over time, kernel K: out[t] = b + sum_k w[k] * in[t - (K-1) + k].

    weight [K, channels] (w[K-1] multiplies the current token), bias [channels]; `axis` is the channels'
    logical axis.
    """

    def __init__(self, channels: int, kernel: int, use_bias: bool, param_dtype, rngs: nnx.Rngs, axis: str):
        bound = 1.0 / math.sqrt(kernel)  # kaiming_uniform(a=sqrt(5)) with fan_in = kernel (depthwise)
        self.weight = param(jax.random.uniform(rngs.params(), (kernel, channels), param_dtype, -bound, bound),
                            ("conv_kernel", axis))
        self.bias = (param(jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound, bound), (axis,))
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

    def prefix_windows(self, x: jax.Array, prefix: jax.Array) -> jax.Array:
        """The prefix after each position of x [batch, seq, channels]: [batch, seq, K-1, channels]."""
        k = self.kernel - 1
        full = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)                 # [b, k + t, c]
        return jnp.stack([full[:, i + 1:i + 1 + k] for i in range(x.shape[1])], axis=1)


class Mamba2Mixer(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden], with the mixer interface of layers/common.py."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        h, g, n = cfg.mamba_num_heads, cfg.n_groups, cfg.ssm_state_size
        d, inner, pd = cfg.hidden_size, cfg.mamba_inner, cfg.param_dtype
        bias = cfg.mamba_proj_bias
        self.in_proj_z = linear(cfg, d, inner, rngs, ("embed", "mamba_heads"), bias=bias)
        self.in_proj_x = linear(cfg, d, inner, rngs, ("embed", "mamba_heads"), bias=bias)
        self.in_proj_B = linear(cfg, d, g * n, rngs, ("embed", "ssm_groups"), bias=bias)
        self.in_proj_C = linear(cfg, d, g * n, rngs, ("embed", "ssm_groups"), bias=bias)
        self.in_proj_dt = linear(cfg, d, h, rngs, ("embed", "mamba_heads"), bias=bias)
        self.conv_x = CausalDepthwiseConv(inner, cfg.conv_kernel, cfg.use_conv_bias, pd, rngs, "mamba_heads")
        self.conv_B = CausalDepthwiseConv(g * n, cfg.conv_kernel, cfg.use_conv_bias, pd, rngs, "ssm_groups")
        self.conv_C = CausalDepthwiseConv(g * n, cfg.conv_kernel, cfg.use_conv_bias, pd, rngs, "ssm_groups")
        # S4D-real init: A = -U(1, 16); dt log-uniform in [time_step_min, time_step_max], stored as
        # inverse-softplus so softplus(dt_bias) = dt; D = 1 (quant_training.md §7).
        self.A_log = param(jnp.log(jax.random.uniform(rngs.params(), (h,), F32, 1.0, 16.0)).astype(pd),
                           ("mamba_heads",))
        log_dt = jax.random.uniform(rngs.params(), (h,), F32, math.log(cfg.time_step_min), math.log(cfg.time_step_max))
        dt = jnp.maximum(jnp.exp(log_dt), cfg.time_step_floor)
        self.dt_bias = param((dt + jnp.log(-jnp.expm1(-dt))).astype(pd), ("mamba_heads",))
        self.D = param(jnp.ones((h,), pd), ("mamba_heads",))
        self.norm = GatedGroupRMSNorm(inner, g, cfg.layer_norm_epsilon, pd)
        self.out_proj = linear(cfg, inner, d, rngs, ("mamba_heads", "embed"), bias=bias, std=output_init_std(cfg))
        # Optional [heads, head_dim] 0/1 mask (an nnx.Variable; compress/ sets it): masked channels give no output
        # and are left out of the gated norm's group statistics, so the layer computes what the layer with those
        # heads and channels pruned computes.
        self.channel_mask = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, dtype) -> MambaState:
        cfg, k, gn = self.cfg, self.cfg.conv_kernel - 1, self.cfg.n_groups * self.cfg.ssm_state_size
        return MambaState(jnp.zeros((batch, k, cfg.mamba_inner), dtype), jnp.zeros((batch, k, gn), dtype),
                          jnp.zeros((batch, k, gn), dtype),
                          jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), F32))

    def discretize_dt(self, dt_raw: jax.Array, mode: Mode) -> jax.Array:
        """dt = softplus(dt_raw + dt_bias) in fp32, limited by time_step_limit; with dt_clamp='hf' also floored
        at time_step_min on TRAIN, PREFILL and EXTEND forwards, as transformers 5.0-5.24 did on its chunked path."""
        cfg = self.cfg
        dt = jax.nn.softplus(dt_raw.astype(F32) + self.dt_bias[...].astype(F32))
        lo, hi = cfg.time_step_limit
        if mode in (Mode.TRAIN, Mode.PREFILL, Mode.EXTEND) and cfg.runtime.dt_clamp == "hf":
            lo = max(lo, cfg.time_step_min)
        if lo > 0.0 or hi != math.inf:
            dt = jnp.clip(dt, lo, hi)
        return dt

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, cache: Optional[MambaState] = None,
                 mode: Mode = Mode.TRAIN) -> tuple[jax.Array, Optional[MambaState]]:
        """x [batch, seq, hidden]; mask [batch, seq] (1 = real token) zeroes padded positions before the
        projections and after the conv, as HF does, so a left-padded row's state stays exactly zero."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
        keep = None if mask is None else mask.astype(x.dtype)[:, :, None]
        if keep is not None:
            x = x * keep
        z = self.in_proj_z(x)
        convs = (self.conv_x, self.conv_B, self.conv_C)
        inputs = (self.in_proj_x(x), self.in_proj_B(x), self.in_proj_C(x))
        # head and head-dim channel importance (Minitron-SSM: the x part of the input projection)
        record(self, lambda: {"x": channel_stat(inputs[0].reshape(b, t, h, p))})
        fresh = cache is None or mode is Mode.PREFILL              # PREFILL starts from zero whatever the cache held
        prefixes = (None,) * 3 if fresh else (cache.conv_x, cache.conv_B, cache.conv_C)
        convolved = [conv(a, prefix) for conv, a, prefix in zip(convs, inputs, prefixes)]  # (out, new prefix)
        xs, B, C = (jax.nn.silu(out) if keep is None else jax.nn.silu(out) * keep.astype(F32) for out, _ in convolved)
        dt = self.discretize_dt(self.in_proj_dt(x), mode)
        A = -jnp.exp(self.A_log[...].astype(F32))
        D = self.D[...].astype(F32)
        x4, B4, C4 = xs.reshape(b, t, h, p), B.reshape(b, t, g, n), C.reshape(b, t, g, n)
        if mode is Mode.DECODE:             # the one-token recurrence, no chunking
            if t != 1:
                raise ValueError(f"DECODE takes one token per row, got {t}")
            y, state = ssd.step(cache.ssm, x4[:, 0], dt[:, 0], A, B4[:, 0], C4[:, 0], D)
            y = y[:, None]
        elif mode is Mode.VERIFY:           # the state after every position, to roll back rejected drafts
            y, state = ssd.ssd(x4, dt, A, B4, C4, D, cache.ssm, impl="naive", return_all_states=True)
        else:                               # TRAIN, PREFILL, EXTEND
            y, state = ssd.ssd(x4, dt, A, B4, C4, D, None if fresh else cache.ssm,
                               impl=cfg.runtime.ssd_impl, chunk_size=cfg.runtime.chunk_size)
        keep = None if self.channel_mask is None else self.channel_mask[...].astype(F32).reshape(h * p)
        y = self.norm(y.reshape(b, t, h * p), z, keep)                    # fp32
        out = self.out_proj(y.astype(cfg.compute_dtype))
        if mode is Mode.TRAIN:
            return out, None
        if mode is Mode.VERIFY:
            new_prefixes = [conv.prefix_windows(a, prefix) for conv, a, prefix in zip(convs, inputs, prefixes)]
        else:
            new_prefixes = [prefix for _, prefix in convolved]
        return out, MambaState(*new_prefixes, state)
