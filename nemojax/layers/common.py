"""What every layer shares: the forward mode, the mixer interface, and parameter constructors that declare each
weight's logical axes (sharding.py maps them to the mesh; a weight without axes is an error there).

The mixer interface (Mamba-2, attention, MLP, MoE; layers/block.py passes every mixer the same arguments):
    __call__(x [batch, t, hidden], *, mask [batch, t] or None (1 = real token), cache, mode) -> (y, new cache)
    init_cache(batch, max_len, dtype) -> the mixer's empty inference cache (None for stateless mixers)
Caches are pytrees that carry what their mixer needs to continue (KV caches their own write position), declare
the logical axes of their arrays (LOGICAL_AXES) and offer `rewind(pos, index)` for speculative decoding. A mixer
that normalises its own inputs sets `pre_norm = False`; the block then adds no pre-norm.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig


class Mode(enum.Enum):
    """What a forward pass is for.

    TRAIN    whole sequences without a cache (training, evaluation, scoring); MoE layers record router stats
    PREFILL  a prompt written into an empty cache (positions from 0: attention over the new keys only)
    EXTEND   several tokens continuing the cache (a prompt chunk after the first, a new turn): attention at the
             cache's position, the chunked SSD from the Mamba state
    DECODE   one token per row continuing the cache
    VERIFY   several tokens continuing the cache, keeping the Mamba state after every one of them (speculative
             decoding rolls back to any); dt follows decode semantics
    """
    TRAIN = "train"
    PREFILL = "prefill"
    EXTEND = "extend"
    DECODE = "decode"
    VERIFY = "verify"


# Per-layer ids of linear layers. A linear layer's dot_general may be a dataclass with an integer `uid` (the
# quantized matmuls fold it into their stochastic-rounding key, quant/recipe.py). A scanned unit of blocks
# (block.py) is traced once, as its first repeat, and passes each repeat's offset here, which such a
# dot_general adds to its uid (a traced int inside the scan).
_UID_SHIFT: contextvars.ContextVar = contextvars.ContextVar("nemojax_uid_shift", default=0)


@contextlib.contextmanager
def uid_shift(shift):
    """Linear-layer uids traced inside this block are offset by `shift` (an int or a traced int)."""
    token = _UID_SHIFT.set(shift)
    try:
        yield
    finally:
        _UID_SHIFT.reset(token)


def current_uid_shift():
    return _UID_SHIFT.get()


class Importance(nnx.Variable):
    """Activation statistics a calibration forward sums up (compress/importance.py). Modules write them with
    `record`, which does nothing unless the forward runs under nnx.capture(Importance): ordinary forwards trace
    no extra work and models hold no such variables."""


def record(module: nnx.Module, stats) -> None:
    """While nnx.capture(Importance) runs the forward, adds each array of stats() ({name: fp32 array}, computed
    only then) to the module's captured value of that name."""
    if any(type(v) is Importance for v in getattr(module, "__captures__", ())):
        for name, value in stats().items():
            module.sow(Importance, name, value, init_fn=lambda: 0, reduce_fn=operator.add)


def channel_stat(a: jax.Array) -> jax.Array:
    """Minitron's aggregation of activations a [batch, seq, *channels] -> [*channels]: the sum over rows of the
    squared mean |a| over the sequence (the importance score is the square root of its sum over calibration
    batches: mean over sequence, L2 over batch)."""
    return jnp.sum(jnp.mean(jnp.abs(a.astype(jnp.float32)), axis=1) ** 2, axis=0)


def mask_value(mask, dtype) -> Optional[jax.Array]:
    """The array of an optional elastic mask attribute (an nnx.Variable set by compress/elastic.py, or None)
    in `dtype`. A mask of 0/1 makes the layer compute what the layer with the 0 units pruned computes."""
    return None if mask is None else mask[...].astype(dtype)


def param(value: jax.Array, axes: tuple) -> nnx.Param:
    """A parameter with its logical axes, one name per dimension (sharding.RULES)."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def output_init_std(cfg: ModelConfig) -> float:
    """Megatron's scaled init for projections that write into the residual stream: sigma / sqrt(2 L)."""
    if not cfg.rescale_prenorm_residual:
        return cfg.initializer_range
    return cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_einsum_grads(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    """x [..., K] @ kernel [K, N] whose backward pass is written as two einsums."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _matmul_fwd(x, kernel, precision):
    return _matmul_einsum_grads(x, kernel, precision), (x, kernel)


def _matmul_bwd(precision, residuals, dy):
    x, kernel = residuals
    dx = jnp.einsum("...n,kn->...k", dy, kernel, precision=precision).astype(x.dtype)
    dkernel = jnp.einsum("...k,...n->kn", x, dy, precision=precision).astype(kernel.dtype)
    return dx, dkernel


_matmul_einsum_grads.defvjp(_matmul_fwd, _matmul_bwd)


def linear_dot(x, kernel, dims, precision=None, preferred_element_type=None, out_sharding=None):
    """The dot_general of the model's nnx.Linear layers: jax.lax.dot_general, except that on the CPU backend
    the backward pass is two explicit einsums (dx = dy kernel^T, dkernel = x^T dy over all leading axes), which
    XLA:CPU runs without transposing copies of dy (docs/architecture.md, "Linear backward on CPU"). Same forward
    and gradients; accelerators keep autodiff's form. Forward-mode autodiff through it is unsupported, as for
    every custom_vjp."""
    standard = dims == (((x.ndim - 1,), (0,)), ((), ())) and kernel.ndim == 2
    if (standard and preferred_element_type is None and out_sharding is None
            and jax.default_backend() == "cpu"):
        return _matmul_einsum_grads(x, kernel, precision)
    return jax.lax.dot_general(x, kernel, dims, precision=precision, preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


def linear(cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, axes: tuple, *, bias: bool = False,
           std: float | None = None) -> nnx.Linear:
    """nnx.Linear with kernel [d_in, d_out] ~ N(0, std) (default `initializer_range`) and logical axes `axes`
    (the bias takes the output axis), zero bias and `linear_dot`."""
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                      dot_general=linear_dot, kernel_metadata={"logical_axes": tuple(axes)},
                      bias_metadata={"logical_axes": tuple(axes[1:])},
                      kernel_init=nnx.initializers.normal(cfg.initializer_range if std is None else std),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)
