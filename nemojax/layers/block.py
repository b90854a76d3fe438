"""Pre-norm residual block h + mixer(RMSNorm(h)), the mixer built from the pattern-character table
(config.LAYER_KINDS), and the one loop that runs a stack of blocks (the model's and the MTP head's).

With runtime.scan_layers the TRAIN forward runs repeated units of the layer pattern as one `lax.scan` each
(scan_plan), so the compiler sees each unit once instead of every layer: compile time follows the number of
distinct units, not depth. Parameters stay stored per layer (checkpoint, HF and sharding layouts unchanged);
the scan stacks them inside the step, pinned to their own shardings with a replicated leading 'layers' axis.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import LAYER_KINDS, ModelConfig
from nemojax.layers.common import Mode, channel_stat, mask_value, record, uid_shift
from nemojax.layers.norm import RMSNorm
from nemojax.sharding import constrain

# logical axes (sharding.RULES) of the residual stream between blocks (positions split over 'tensor': sequence
# parallelism) and of a mixer's input (whole sequences: the layout every mixer is written for)
RESIDUAL = ("batch", "act_seq", "act_embed")
MIXER_IN = ("batch", "seq", "act_embed")


def make_mixer(char: str, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    module, cls = LAYER_KINDS[char].mixer.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, rngs)


class Block(nnx.Module):
    """h [batch, seq, hidden] -> h + mixer(RMSNorm(h)), in a profile scope named after the layer (`scope`)."""

    def __init__(self, char: str, cfg: ModelConfig, rngs: nnx.Rngs, scope: str = "block"):
        self.kind = char
        self.scope = f"{scope}_{LAYER_KINDS[char].name}"
        self.mixer = make_mixer(char, cfg, rngs)
        # a mixer may normalise its own inputs instead (attention with the QKV-norm stability option)
        pre_norm = getattr(self.mixer, "pre_norm", True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, cfg.param_dtype) if pre_norm else None
        self.compute_dtype = cfg.compute_dtype
        # HF keeps the residual stream in the activation dtype; residual_in_fp32 (NVIDIA's option) keeps fp32.
        self.residual_dtype = jnp.float32 if cfg.residual_in_fp32 else self.compute_dtype
        # optional elastic masks (compress/elastic.py): embedding channels [hidden] and the layer itself [] (0:
        # skipped, the block passes h through)
        self.embed_mask = nnx.data(None)
        self.layer_mask = nnx.data(None)

    def __call__(self, h: jax.Array, *, mask: Optional[jax.Array] = None, cache=None, mode: Mode = Mode.TRAIN):
        """Returns (h', the mixer's new cache); the mixer gets the same arguments whatever its kind."""
        with jax.named_scope(self.scope):
            x = h.astype(self.compute_dtype)
            keep = mask_value(self.embed_mask, jnp.float32)
            # the norm runs on the positions this chip holds; the mixer gets whole sequences (all-gather)
            normed = constrain(x if self.norm is None else self.norm(x, keep), MIXER_IN)
            record(self, lambda: {"embed": channel_stat(normed)})           # embedding-channel importance
            y, cache = self.mixer(normed, mask=mask, cache=cache, mode=mode)
            y = constrain(y, RESIDUAL)              # the row-parallel output reduce-scattered over positions
            if keep is not None:
                y = y * keep.astype(y.dtype)
            if self.layer_mask is not None:
                y = y * mask_value(self.layer_mask, y.dtype)
            out = h.astype(self.residual_dtype) + y.astype(self.residual_dtype)
            # block importance: 1 - mean cos(in, out) over the positions seen
            record(self, lambda: {"cosine": _cosine_sum(h, out), "tokens": jnp.float32(h.shape[0] * h.shape[1])})
            return out, cache


def _cosine_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    """Sum over positions of cos(a, b) along the hidden axis, fp32; a, b [batch, seq, hidden]."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    return jnp.sum(dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12))


def _call(block: Block, h, mask, cache, mode):
    return block(h, mask=mask, cache=cache, mode=mode)


def _remat_policy(remat: str):
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None


def run_blocks(blocks: Sequence[Block], h: jax.Array, *, mask: Optional[jax.Array], caches: Optional[Sequence],
               mode: Mode, remat: str = "none", scan: bool = False) -> tuple[jax.Array, Optional[tuple]]:
    """h through the blocks in order -> (h, new caches: one per block, or None in TRAIN mode).

    remat (TRAIN mode only): 'none' keeps every activation for the backward pass, 'block' keeps only block
    inputs and recomputes the rest, 'dots' also keeps matmul outputs (recomputes only the cheap elementwise
    work: norms, activations, the SSD's exp/cumsum). scan (TRAIN mode only): repeated units of blocks run as
    one lax.scan each (scan_plan); the same function, compiled once per unit."""
    if mode is Mode.TRAIN and scan:
        if caches is not None:
            raise ValueError("TRAIN mode takes no caches")
        for start, unit, repeats in scan_plan([block_key(b) for b in blocks]):
            segment = blocks[start:start + unit * repeats]
            h = (_scan_unit(segment, unit, h, mask, remat) if repeats > 1 else
                 run_blocks(segment, h, mask=mask, caches=None, mode=mode, remat=remat)[0])
        return h, None
    call = _call
    if mode is Mode.TRAIN and remat != "none":
        call = nnx.remat(_call, policy=_remat_policy(remat), static_argnums=(4,))
    new = []
    for block, cache in zip(blocks, caches if caches is not None else [None] * len(blocks), strict=True):
        h, cache = call(block, h, mask, cache, mode)
        h = constrain(h, RESIDUAL)
        new.append(cache)
    return h, None if caches is None else tuple(new)


def _uid_dots(block: Block) -> list:
    """(linear layer, its dot_general) for every linear layer whose dot_general carries a `uid` (common.py)."""
    return [(node, node.dot_general) for _, node in nnx.iter_graph(block)
            if isinstance(node, nnx.Linear) and hasattr(node.dot_general, "uid")]


def uid_base(block: Block) -> int:
    """The smallest linear-layer uid in the block (common.py), 0 if none carries one."""
    return min((dot.uid for _, dot in _uid_dots(block)), default=0)


def block_key(block: Block) -> Hashable:
    """Blocks with equal keys compute the same function of their own variables, so one scan body serves them:
    the structure (graphdef) and variable shapes, without what names a layer: its profile scope and the
    absolute uids of its linear layers (relative ones are kept; the scan shifts them)."""
    dots, base, scope = _uid_dots(block), uid_base(block), block.scope
    try:
        block.scope = ""
        for lin, dot in dots:
            lin.dot_general = dataclasses.replace(dot, uid=dot.uid - base)
        graphdef, state = nnx.split(block)
    finally:
        block.scope = scope
        for lin, dot in dots:
            lin.dot_general = dot
    return graphdef, tuple((path, type(v), tuple(v.get_value().shape), v.get_value().dtype)
                           for path, v in state.flat_state())


def scan_plan(keys: Sequence[Hashable], max_unit: int = 32) -> list[tuple[int, int, int]]:
    """Cover a sequence of block keys with segments (start, unit length, repeats): repeats > 1 is a unit that
    repeats back to back (one scan), repeats == 1 a run of blocks left unrolled. Minimises the number of blocks
    the compiler sees (unit lengths + unrolled blocks), then the number of segments (dynamic programming).

    Nemotron-H 56B's pattern is "M-M-M-M*-M-" x 10 + "M-" x 4: 118 blocks, 13 traced."""
    n = len(keys)
    best = [(0, 0)] * (n + 1)          # (blocks compiled, segments) for keys[i:]
    choice = [(1, 1)] * (n + 1)        # (unit, repeats) taken at i
    for i in range(n - 1, -1, -1):
        best[i] = (1 + best[i + 1][0], 1 + best[i + 1][1])
        for unit in range(1, min(max_unit, (n - i) // 2) + 1):
            pattern, repeats = keys[i:i + unit], 1
            while keys[i + repeats * unit:i + (repeats + 1) * unit] == pattern:
                repeats += 1
            for r in range(2, repeats + 1):
                cost = (unit + best[i + r * unit][0], 1 + best[i + r * unit][1])
                if cost < best[i]:
                    best[i], choice[i] = cost, (unit, r)
    plan, i = [], 0
    while i < n:
        unit, r = choice[i]
        if r == 1 and plan and plan[-1][2] == 1:           # extend the previous unrolled run
            plan[-1] = (plan[-1][0], plan[-1][1] + 1, 1)
        else:
            plan.append((i, unit, r))
        i += unit * r
    return plan


def _used_as(block: Block) -> dict:
    """{variable path: dtype} for the variables the block only ever reads cast to a narrower compute dtype:
    nnx.Linear kernels and biases (promoted to the layer's dtype) and what a module lists in CAST_ON_USE (next
    to its `compute_dtype`). The scan stacks these already cast, which halves the stacked copy of fp32
    parameters and gives the same function and gradients (the cast commutes with stacking)."""
    out = {}
    for path, node in nnx.iter_graph(block):
        if isinstance(node, nnx.Linear) and node.dtype is not None:
            names, dtype = ("kernel", "bias"), node.dtype
        elif hasattr(node, "CAST_ON_USE"):
            names, dtype = node.CAST_ON_USE, node.compute_dtype
        else:
            continue
        for name in names:
            var = getattr(node, name, None)
            if isinstance(var, nnx.Variable) and jnp.dtype(dtype).itemsize < var.get_value().dtype.itemsize:
                out[tuple(path) + (name,)] = jnp.dtype(dtype)
    return out


def _stack(states: list, casts: dict):
    """Per-layer nnx states of equal structure -> one state whose arrays have a leading 'layers' axis (the
    variables in `casts` stacked in their compute dtype)."""
    def stack(path, *values):
        return jnp.stack([v.astype(casts[path]) if path in casts else v for v in values])

    flat = [dict(s.flat_state()) for s in states]
    out = jax.tree.map(lambda v: v, states[0])           # a copy of the first state's structure
    for path, var in out.flat_state():
        var.set_value(stack(path, *(f[path].get_value() for f in flat)))
    return _constrain_state(out, ("layers",))


def _constrain_state(state, leading: tuple = ()):
    """Pins every array of an nnx state to its variable's logical axes (with `leading` axes prepended)."""
    for _, var in state.flat_state():
        axes = var.get_metadata().get("logical_axes")
        if axes is not None:
            var.set_value(constrain(var.get_value(), leading + tuple(axes)))
    return state


def _scan_unit(blocks: Sequence[Block], unit: int, h: jax.Array, mask, remat: str) -> jax.Array:
    """Blocks[0:unit] repeated len(blocks) // unit times, run as one lax.scan over their stacked variables.
    Each unit position is traced once as its first repeat; the scan feeds every repeat's variables and its
    rounding-key id shift. Variables the forward writes (MoE router statistics: all but parameters) come back
    per layer."""
    repeats = len(blocks) // unit
    graphdefs, stacked, shifts = [], [], []
    for j in range(unit):
        copies = [blocks[j + q * unit] for q in range(repeats)]
        splits = [nnx.split(b) for b in copies]
        graphdefs.append(splits[0][0])
        stacked.append(_stack([s for _, s in splits], _used_as(copies[0])))
        shifts.append(jnp.asarray([uid_base(b) - uid_base(copies[0]) for b in copies], jnp.int32))

    def apply(graphdef, state, h, shift):
        block = nnx.merge(graphdef, _constrain_state(state))
        with uid_shift(shift):
            h, _ = block(h, mask=mask, cache=None, mode=Mode.TRAIN)
        return constrain(h, RESIDUAL), nnx.state(block, nnx.Not(nnx.Param))

    if remat != "none":
        apply = jax.checkpoint(apply, policy=_remat_policy(remat), static_argnums=(0,))

    def body(h, xs):
        written = []
        for graphdef, (state, shift) in zip(graphdefs, xs):
            h, out = apply(graphdef, state, h, shift)
            written.append(out)
        return h, written

    with jax.named_scope(f"scan_{blocks[0].scope}_x{repeats}"):
        h, written = jax.lax.scan(body, h, list(zip(stacked, shifts)))
    for j, out in enumerate(written):
        for q in range(repeats):
            nnx.update(blocks[j + q * unit], jax.tree.map(lambda x: x[q], out))
    return h
