"""Precision recipes applied to a model: which linear layers run which fake-quantized matmul.

`apply_precision(model, "nvfp4")` swaps the `dot_general` of the model's nnx.Linear layers for a `QuantDot`,
so the model code stays unchanged and any model (fresh, HF-converted, restored) can be switched. Embeddings,
MoE routers, the MTP head, attention's QK/PV products, the Mamba scan and the convolution always stay in the
model's dtype (every NVIDIA recipe keeps them high precision); the lm_head does too unless
`quantize_lm_head` is set. MoE expert weights are not
nnx.Linear layers and stay high precision as well.

Stochastic rounding needs a fresh key per step and layer: the train step opens `rounding_key(key)` around the
forward/backward trace and each QuantDot folds its layer id into it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ConfigError, check_choices
from nemojax.layers.common import current_uid_shift, linear_dot

PRECISIONS = ("bf16", "fp8", "nvfp4", "aqt_int8", "aqt_int4")
F32 = jnp.float32

_ROUNDING_KEY: contextvars.ContextVar = contextvars.ContextVar("nemojax_rounding_key", default=None)


@contextlib.contextmanager
def rounding_key(key: jax.Array):
    """Stochastic-rounding key for the quantized matmuls traced inside this block (one per train step)."""
    token = _ROUNDING_KEY.set(key)
    try:
        yield
    finally:
        _ROUNDING_KEY.reset(token)


def _layer_key(uid: int) -> jax.Array:
    """uid + the scan's shift (layers/common.py uid_shift): a scanned layer is traced once with the uids of its
    first repeat, so every repeat still gets its own rounding key."""
    base = _ROUNDING_KEY.get()
    return jax.random.fold_in(jax.random.key(0) if base is None else base, uid + current_uid_shift())


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Details of the precision recipe (run configs: `train.quant.<field>`). None = the recipe's default."""

    bf16_first: Optional[int] = None          # blocks at the start kept high precision (fp8: 2, nvfp4: ~3%)
    bf16_last: Optional[int] = None           # blocks at the end kept high precision (fp8: 2, nvfp4: ~13%)
    quantize_attention: Optional[bool] = None  # attention projections (nvfp4 keeps them high precision)
    quantize_lm_head: bool = False            # the output layer (every recipe keeps it high precision)
    bf16_forward_from_step: int = 0           # from this step on the forward runs high precision (0 = never)
    nvfp4_2d_weights: bool = True             # 16x16 weight blocks (else 1x16 along the contraction axis)
    nvfp4_rht: bool = True                    # random Hadamard transform on the wgrad operands
    stochastic_rounding: bool = True          # on gradients only (nvfp4, aqt)
    fp8_grad_format: Literal["e4m3", "e5m2"] = "e4m3"  # e4m3 (Nemotron-H paper) or e5m2 (TE's "hybrid")
    aqt_bits: Optional[tuple] = None          # (fwd, dgrad, wgrad) bits; None = preset (int8: 8,8,8; int4: 4,8,8)

    def __post_init__(self):
        check_choices(self, "train.quant")
        if self.aqt_bits is not None:
            object.__setattr__(self, "aqt_bits", tuple(self.aqt_bits))
            if len(self.aqt_bits) != 3 or any(b not in (None, 2, 4, 8) for b in self.aqt_bits):
                raise ConfigError(f"quant.aqt_bits must be (fwd, dgrad, wgrad) with each 2, 4, 8 or None, "
                                  f"got {self.aqt_bits!r}")
        for name in ("bf16_first", "bf16_last", "bf16_forward_from_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"quant.{name} must be >= 0, got {value}")

    def high_precision_blocks(self, precision: str, num_blocks: int) -> tuple[int, int]:
        """(first, last) block counts kept high precision."""
        if precision == "fp8":           # Megatron-Bridge nemotron_h fp8 recipe: first 2 and last 2 layers
            default = (2, 2)
        elif precision == "nvfp4":       # NVFP4 paper, 12B / 62 blocks: first 2 and last 8 (~16%, mostly at the end)
            default = (round(2 * num_blocks / 62), round(8 * num_blocks / 62))
        else:
            default = (0, 0)
        return (default[0] if self.bf16_first is None else self.bf16_first,
                default[1] if self.bf16_last is None else self.bf16_last)

    def attention_quantized(self, precision: str) -> bool:
        return precision != "nvfp4" if self.quantize_attention is None else self.quantize_attention


@dataclasses.dataclass(frozen=True)
class QuantDot:
    """A dot_general for nnx.Linear (x [..., K] @ kernel [K, N]) that runs a fake-quantized matmul.
    kind: nvfp4 (the training recipe), nvfp4_ste (W4A4 forward, straight-through backward: PTQ and the QAD
    student), fp8, aqt; uid: the layer id folded into the stochastic-rounding key (the `uid` protocol of
    layers/common.py, which lets scanned layers share one trace)."""

    kind: str
    uid: int
    options: QuantOptions = QuantOptions()
    aqt_bits: tuple = (8, 8, 8)
    quantize_fprop: bool = True

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        o = self.options
        if self.kind == "nvfp4":
            from nemojax.quant.nvfp4 import NVFP4Recipe, nvfp4_matmul

            recipe = NVFP4Recipe(o.nvfp4_2d_weights, o.nvfp4_rht, o.stochastic_rounding, self.quantize_fprop)
            return nvfp4_matmul(x, w, _layer_key(self.uid), recipe)
        if self.kind == "nvfp4_ste":
            from nemojax.quant.nvfp4 import ste_matmul

            return ste_matmul(x, w)
        if self.kind == "fp8":
            from nemojax.quant.fp8 import fp8_matmul

            return fp8_matmul(x, w, o.fp8_grad_format, self.quantize_fprop)
        if self.kind == "aqt":
            from nemojax.quant.aqt import aqt_matmul

            bits = self.aqt_bits if self.quantize_fprop else (None,) + tuple(self.aqt_bits[1:])
            return aqt_matmul(x, w, _layer_key(self.uid), bits)
        raise ValueError(f"unknown quantized matmul kind {self.kind!r}")

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
        (lc, rc), (lb, rb) = dimension_numbers
        if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
            raise ValueError(f"QuantDot handles x [..., K] @ w [K, N] only, got dimension_numbers "
                             f"{dimension_numbers} for shapes {lhs.shape} @ {rhs.shape}")
        y = self.matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
        return y.reshape(*lhs.shape[:-1], rhs.shape[1]).astype(preferred_element_type or lhs.dtype)


def _linears(module: nnx.Module):
    return [node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Linear)]


def apply_precision(model, precision: str, options: QuantOptions = QuantOptions(), *, step: int = 0,
                    straight_through: bool = False) -> dict:
    """Sets every eligible linear layer of a NemotronH to `precision` (bf16 = no quantization: the model's
    own dtype). step: the current train step (for `bf16_forward_from_step`). straight_through: NVFP4 W4A4
    forward with straight-through gradients instead of the training recipe (PTQ evaluation, QAD student).
    Returns {"quantized": n, "high_precision": m} counts of linear layers."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if straight_through and precision != "nvfp4":
        raise ConfigError(f"straight-through fake quantization is defined for nvfp4 only, not {precision!r}")
    blocks = list(model.layers)
    first, last = options.high_precision_blocks(precision, len(blocks))
    fprop = not (options.bf16_forward_from_step and step >= options.bf16_forward_from_step)
    kind = {"fp8": "fp8", "nvfp4": "nvfp4_ste" if straight_through else "nvfp4"}.get(precision, "aqt")
    if precision.startswith("aqt_"):
        from nemojax.quant.aqt import PRESETS

        if not options.stochastic_rounding:
            raise ConfigError("the aqt presets always use stochastic rounding on gradients")
        bits = options.aqt_bits or PRESETS[precision]
    else:
        bits = (8, 8, 8)
    # (linear layer, kept high precision?) in a fixed order: the position is the layer's rounding-key id
    plan = [(lin, precision == "bf16" or i < first or i >= len(blocks) - last
             or (block.kind == "*" and not options.attention_quantized(precision)))
            for i, block in enumerate(blocks) for lin in _linears(block)]
    if model.lm_head is not None:
        plan.append((model.lm_head, precision == "bf16" or not options.quantize_lm_head))
    for uid, (lin, high) in enumerate(plan):
        lin.dot_general = linear_dot if high else QuantDot(kind, uid, options, bits, fprop)
    return {"quantized": sum(not high for _, high in plan), "high_precision": sum(high for _, high in plan)}


def precision_of(model) -> dict:
    """{block index: QuantDot kind or 'high'} for inspection and tests."""
    out = {}
    for i, block in enumerate(model.layers):
        kinds = {lin.dot_general.kind if isinstance(lin.dot_general, QuantDot) else "high"
                 for lin in _linears(block)}
        out[i] = kinds.pop() if len(kinds) == 1 else sorted(kinds)
    return out
