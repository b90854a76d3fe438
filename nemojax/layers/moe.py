"""Sigmoid-routed mixture of experts with optional LatentMoE projections (architecture.md §6).

Router (fp32): s = sigmoid(x W^T); the correction bias only steers *which* experts are picked (group-limited
top-k over s + bias); the weights are the unbiased s of the picked experts, normalised to sum 1
(norm_topk_prob) and multiplied by routed_scaling_factor. Experts are non-gated relu^2 MLPs; one shared expert
at full width runs on every token. With moe_latent_size L the routed experts run at width L between
fc1_latent_proj (D->L) and fc2_latent_proj (L->D).

Expert compute is sparse in FLOPs, with static shapes under jit:
    'ragged'    tokens sorted by expert, jax.lax.ragged_dot grouped matmuls (dropless; fast on GPU,
                lowered densely on CPU)
    'gmm'       the same sorted rows through the megablox grouped-matmul Pallas TPU kernel (dropless). XLA's
                TPU lowering of ragged_dot builds [experts, rows] masks padded to 128 lanes (about 12 GB per
                buffer for Nemotron 3 Super's 512 experts); the kernel visits only each group's row tiles.
    'capacity'  tokens sorted by expert into [experts, capacity, width] slots and one batched matmul; a
                token past its expert's capacity is dropped from that expert (its shared-expert path stays).
                capacity_factor=None sizes the slots for the worst case (dropless, exact).
    'dense'     every expert on every token, weighted by the (mostly zero) routing matrix: the reference.
    'auto'      gmm on TPU, ragged on GPU, capacity on CPU.
Each forward in TRAIN mode records the router load (and the aux loss when moe_aux_loss_coef > 0) in variables
that training reads (train/loss.py: aux-loss-free bias updates, the balance loss).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.common import Mode, linear, mask_value, output_init_std, param, record
from nemojax.layers.mlp import MLP, relu2
from nemojax.sharding import entry_axes, logical_to_spec

F32 = jnp.float32


class ExpertBias(nnx.Variable):
    """e_score_correction_bias: steers expert selection only; updated by load balancing, not by gradients."""


class RouterLoad(nnx.Variable):
    """Per-expert share of routed assignments in the last forward ([experts], sums to 1), for metrics and the
    aux-loss-free bias update."""


class AuxLoss(nnx.Variable):
    """Switch-style load-balancing loss of the last forward (scalar), when moe_aux_loss_coef > 0."""


class Routing(NamedTuple):
    weights: jax.Array   # [tokens, k] fp32 combine weights
    experts: jax.Array   # [tokens, k] int32 expert ids
    scores: jax.Array    # [tokens, experts] fp32 sigmoid scores (unbiased)
    valid: Optional[jax.Array] = None   # [tokens, k] bool: assignments this shard computes (None: all)


def route(x: jax.Array, gate_weight: jax.Array, bias: jax.Array, cfg: ModelConfig,
          expert_mask: Optional[jax.Array] = None) -> Routing:
    """x [tokens, hidden]; gate_weight [hidden, experts]; bias [experts]; expert_mask [experts] (0/1, optional):
    experts never picked, as if pruned (the combine weights are multiplied by the picked experts' mask values,
    1 in the forward, so an elastic router gets their gradient)."""
    logits = jnp.dot(x.astype(F32), gate_weight.astype(F32), precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias.astype(F32)
    if expert_mask is not None:
        choice = jnp.where(expert_mask > 0, choice, -jnp.inf)
    e, ng = cfg.n_routed_experts, cfg.n_group
    if ng > 1:
        grouped = choice.reshape(-1, ng, e // ng)
        group_scores = jax.lax.top_k(grouped, min(2, e // ng))[0].sum(-1)          # [tokens, n_group]
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jnp.zeros_like(group_scores, dtype=bool).at[
            jnp.arange(group_scores.shape[0])[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // ng, axis=1), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    if expert_mask is not None:
        weights = weights * expert_mask[experts]
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


def _expert_mlp_dense(x, up, down):
    """Every expert on every token: x [t, d] -> [t, experts, d]."""
    return jnp.einsum("tei,eid->ted", relu2(jnp.einsum("td,edi->tei", x, up)), down)


def experts_dense(x, up, down, routing: Routing) -> jax.Array:
    """Reference: out[t] = sum_j w[t, j] * expert_{e[t, j]}(x[t]), accumulated in fp32. x [t, d] -> [t, d] fp32."""
    combine = jnp.zeros(routing.scores.shape, F32).at[
        jnp.arange(x.shape[0])[:, None], routing.experts].add(routing.weights)       # [t, experts]
    y = _expert_mlp_dense(x, up, down).astype(F32)
    return jnp.einsum("te,ted->td", combine, y)


def _sorted_assignments(routing: Routing, num_experts: int):
    """Flattens [t, k] assignments and sorts them by expert (stable, so earlier tokens come first); invalid
    assignments (routing.valid) sort last and are not counted. Returns (token, expert, weight, valid, counts)."""
    t, k = routing.experts.shape
    flat_expert = routing.experts.reshape(-1)
    valid = jnp.ones((t * k,), bool) if routing.valid is None else routing.valid.reshape(-1)
    order = jnp.argsort(jnp.where(valid, flat_expert, num_experts), stable=True)
    token = (jnp.arange(t * k) // k)[order]
    expert = flat_expert[order]
    weight = routing.weights.reshape(-1)[order]
    counts = jnp.zeros((num_experts,), jnp.int32).at[flat_expert].add(valid.astype(jnp.int32))
    return token, expert, weight, valid[order], counts


def experts_ragged(x, up, down, routing: Routing) -> jax.Array:
    token, _, weight, valid, counts = _sorted_assignments(routing, up.shape[0])
    h = relu2(jax.lax.ragged_dot(x[token], up, counts))
    y = jax.lax.ragged_dot(h, down, counts).astype(F32) * weight[:, None]
    # rows past the counted groups (invalid assignments) are not part of any group: never let them add
    return jnp.zeros((x.shape[0], down.shape[-1]), F32).at[token].add(jnp.where(valid[:, None], y, 0.0))


GMM_TILE = 128          # megablox tile (rows, contraction, output); a smaller dimension is taken whole


def _gmm_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Tiles for every megablox call, forward and backward (which swap k and n): each block dimension is the tile
    or the whole dimension, as Mosaic requires; rows are padded to the tile."""
    return GMM_TILE, min(GMM_TILE, k), min(GMM_TILE, n)


def experts_gmm(x, up, down, routing: Routing) -> jax.Array:
    """experts_ragged with the megablox kernel: compiled by Mosaic when lowered for TPU, run by the Pallas
    interpreter on any other platform (tests, CPU). Rows are padded to a multiple of the row tile; rows past the
    counted groups (padding, invalid assignments) come out zero from the kernel and are masked again below."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    token, _, weight, valid, counts = _sorted_assignments(routing, up.shape[0])
    pad = -token.shape[0] % GMM_TILE

    def grouped(lhs, rhs, out_dtype):
        return jax.lax.platform_dependent(
            lhs, rhs, counts, tpu=lambda *a: gmm(*a, out_dtype, _gmm_tiling),
            default=lambda *a: gmm(*a, out_dtype, _gmm_tiling, interpret=True))

    h = relu2(grouped(jnp.pad(x[token], ((0, pad), (0, 0))), up, x.dtype))
    y = grouped(h, down, F32)[:token.shape[0]] * weight[:, None]
    return jnp.zeros((x.shape[0], down.shape[-1]), F32).at[token].add(jnp.where(valid[:, None], y, 0.0))


def expert_stats(x, up, down, routing: Routing) -> dict:
    """Importance statistics of the routed experts for tokens x [t, width]: expert_load [experts] (assignments),
    expert_output [experts] (sum over each expert's assignments of routing weight * ||expert output||) and
    expert_neurons [experts, I] (sum of |activation| of each expert's neurons)."""
    token, expert, weight, valid, counts = _sorted_assignments(routing, up.shape[0])
    a = relu2(jax.lax.ragged_dot(x[token], up, counts)).astype(F32)
    y = jax.lax.ragged_dot(a.astype(x.dtype), down, counts).astype(F32)
    e = up.shape[0]
    out = jnp.zeros((e,), F32).at[expert].add(jnp.where(valid, weight * jnp.linalg.norm(y, axis=-1), 0.0))
    neurons = jnp.zeros((e, a.shape[-1]), F32).at[expert].add(jnp.where(valid[:, None], jnp.abs(a), 0.0))
    return {"expert_load": counts.astype(F32), "expert_output": out, "expert_neurons": neurons}


def capacity_for(tokens: int, k: int, experts: int, capacity_factor: Optional[float]) -> int:
    if capacity_factor is None:
        return tokens              # an expert gets each token at most once: exact, never drops
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / experts)))


def experts_capacity(x, up, down, routing: Routing, capacity_factor: Optional[float]) -> jax.Array:
    num_experts = up.shape[0]
    t, k = routing.experts.shape
    cap = capacity_for(t, k, num_experts, capacity_factor)
    token, expert, weight, valid, counts = _sorted_assignments(routing, num_experts)
    starts = jnp.cumsum(counts) - counts
    slot = jnp.arange(t * k) - starts[expert]                                     # rank within its expert
    kept = (slot < cap) & valid
    slot = jnp.where(kept, slot, cap)                                             # overflow -> scratch slot
    buf = jnp.zeros((num_experts, cap + 1, x.shape[-1]), x.dtype).at[expert, slot].set(x[token])
    h = relu2(jnp.einsum("ecd,edi->eci", buf[:, :cap], up))
    y = jnp.einsum("eci,eid->ecd", h, down).astype(F32)                           # [experts, cap, d]
    y = jnp.pad(y, ((0, 0), (0, 1), (0, 0)))[expert, slot] * jnp.where(kept, weight, 0.0)[:, None]
    return jnp.zeros((t, down.shape[-1]), F32).at[token].add(y)


def _vary(a: jax.Array, axes: tuple) -> jax.Array:
    """a marked as varying over `axes` (those it does not vary over already) inside a shard_map."""
    missing = tuple(ax for ax in axes if ax not in jax.typeof(a).manual_axis_type.varying)
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def experts_on_mesh(fn, x, up, down, routing: Routing, check_vma: bool = True) -> jax.Array:
    """fn(x, up, down, routing) -> [t, width] fp32, run per shard when a mesh is set (jax.set_mesh).

    Sorting tokens by expert is a global operation for the partitioner: left to GSPMD, every chip would sort
    and hold the whole global batch's expert activations (Nemotron 3 Super's train step asked for 6 TB per
    chip). Here each token shard routes its own tokens (shard_map over the batch axes). The expert weights are
    gathered over fsdp at the boundary (as FSDP does for every weight) and stay split over 'tensor' (the expert
    MLP width: partial outputs, summed) and over 'expert' (expert parallelism: each expert shard holds
    experts / ep of them).

    The batch is split over 'expert' too (sharding.RULES), so outside the MoE the expert axis is data
    parallel. Inside, every expert shard needs the tokens of its whole expert group:
        1. all-gather the group's tokens and routing over 'expert': [ep, t, width];
        2. for each of the ep token blocks in turn (a lax.map whose body is rematerialized, so activation
           memory is that of one block, as without expert parallelism), compute the assignments that picked this
           shard's experts; the others are marked invalid (sorted last, never computed by gmm);
        3. reduce-scatter the [ep, t, width] partial outputs over 'expert': each token block's sum returns to its
           owner.
    When the batch does not divide over 'expert' the tokens are replicated over it and step 1 is skipped."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else {a: s for a, s in mesh.shape.items() if s > 1}
    if not sizes:
        return fn(x, up, down, routing)
    tokens = logical_to_spec(("batch", None), x.shape, sizes)
    up_spec = logical_to_spec(("experts", None, "expert_mlp"), up.shape, sizes)
    down_spec = logical_to_spec(("experts", "expert_mlp", None), down.shape, sizes)
    expert_axis, width_axis = up_spec[0], up_spec[2]
    gather = expert_axis is not None and expert_axis in entry_axes(tokens[0])
    summed = tuple(a for a in (expert_axis, width_axis) if a is not None)

    def local_routing(weights, experts, scores):
        if expert_axis is None:
            return Routing(weights, experts, scores)
        e = up.shape[0] // sizes[expert_axis]                           # this shard's experts
        first = jax.lax.axis_index(expert_axis) * e
        mine = (experts >= first) & (experts < first + e)
        return Routing(jnp.where(mine, weights, 0.0), jnp.where(mine, experts - first, 0),
                       jax.lax.dynamic_slice_in_dim(scores, first, e, axis=1), mine)

    def local(x, up, down, weights, experts, scores):
        if gather:                                                      # 1. the expert group's tokens
            x, weights, experts, scores = (jax.lax.all_gather(a, expert_axis) for a in (x, weights, experts, scores))
        # the local result differs per expert / tensor shard: said explicitly, because jax 0.10.2 otherwise loses
        # the psum in the transpose of x[token] (varying indices into an invariant x): dx came out wrong
        if summed and check_vma:
            x, weights = (_vary(a, summed) for a in (x, weights))
        if not gather:
            y = fn(x, up, down, local_routing(weights, experts, scores))
            return jax.lax.psum(y, summed) if summed else y

        @jax.checkpoint
        def block(up, down, chunk):                                     # 2. one token block's local assignments
            x, weights, experts, scores = chunk
            return fn(x, up, down, local_routing(weights, experts, scores))

        ys = jax.lax.map(lambda chunk: block(up, down, chunk), (x, weights, experts, scores))
        y = jax.lax.psum_scatter(ys, expert_axis, scatter_dimension=0)   # 3. [t, width] back to each owner
        return jax.lax.psum(y, width_axis) if width_axis is not None else y

    return jax.shard_map(local, in_specs=(tokens, up_spec, down_spec, tokens, tokens, tokens), out_specs=tokens,
                         check_vma=check_vma)(x, up, down, routing.weights, routing.experts, routing.scores)


def resolve_impl(impl: str) -> str:
    if impl not in ("auto", "ragged", "gmm", "capacity", "dense"):
        raise ValueError(f"unknown moe_impl {impl!r}")
    if impl != "auto":
        return impl
    return {"cpu": "capacity", "tpu": "gmm"}.get(jax.default_backend(), "ragged")


class MoE(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden] with the mixer interface of layers/common.py. Stateless."""

    CAST_ON_USE = ("up_proj", "down_proj")      # read only as .astype(compute dtype) (layers/block.py scan)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.compute_dtype = cfg.compute_dtype
        d, e, i, pd = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.param_dtype
        width = cfg.moe_latent_size or d
        init = nnx.initializers.normal(cfg.initializer_range)
        self.gate = param(init(rngs.params(), (d, e), pd), ("embed", "router"))      # HF gate.weight [E, D]
        self.e_score_correction_bias = ExpertBias(jnp.zeros((e,), F32), logical_axes=("router",))
        self.up_proj = param(init(rngs.params(), (e, width, i), pd), ("experts", "expert_embed", "expert_mlp"))
        self.down_proj = param(nnx.initializers.normal(output_init_std(cfg))(rngs.params(), (e, i, width), pd),
                               ("experts", "expert_mlp", "expert_embed"))
        self.shared_experts = MLP(cfg, rngs, intermediate_size=cfg.moe_shared_expert_intermediate_size)
        if cfg.moe_latent_size:
            self.fc1_latent_proj = linear(cfg, d, width, rngs, ("embed", "latent"), bias=cfg.mlp_bias)
            self.fc2_latent_proj = linear(cfg, width, d, rngs, ("latent", "embed"), bias=cfg.mlp_bias,
                                          std=output_init_std(cfg))
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.router_load = RouterLoad(jnp.zeros((e,), F32), logical_axes=("router",))
        self.aux_loss = AuxLoss(jnp.zeros((), F32), logical_axes=())
        self.expert_mask = nnx.data(None)        # optional [experts] 0/1 elastic mask (compress/elastic.py)

    def init_cache(self, batch: int, max_len: int, dtype) -> None:
        return None

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, cache=None, mode: Mode = Mode.TRAIN,
                 impl: Optional[str] = None) -> tuple[jax.Array, None]:
        """impl overrides cfg.runtime.moe_impl. Router statistics are recorded in TRAIN mode only (inside
        decode loops the variables belong to another trace level)."""
        cfg = self.cfg
        compute = cfg.compute_dtype
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(flat, self.gate[...], self.e_score_correction_bias[...], cfg,
                        mask_value(self.expert_mask, F32))
        if mode is Mode.TRAIN:
            self._record_stats(routing)
        h = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)
        up, down = self.up_proj[...].astype(compute), self.down_proj[...].astype(compute)
        # expert importance (calibration only): routed load, routing-weighted output norm, per-expert neurons
        record(self, lambda: expert_stats(h, up, down, routing))
        experts = {"dense": experts_dense, "ragged": experts_ragged, "gmm": experts_gmm,
                   "capacity": lambda *a: experts_capacity(*a, cfg.runtime.moe_capacity_factor)}
        # fp32 accumulation, cast before fc2 (as HF)
        impl = resolve_impl(impl or cfg.runtime.moe_impl)
        # Pallas kernels declare no per-axis variance for their outputs, which check_vma requires
        y = experts_on_mesh(experts[impl], h, up, down, routing, check_vma=impl != "gmm")
        y = y.astype(compute)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        return (y + self.shared_experts.ffn(flat)).reshape(shape), None

    def _record_stats(self, routing: Routing) -> None:
        e, coef = self.cfg.n_routed_experts, self.cfg.runtime.moe_aux_loss_coef
        counts = jnp.zeros((e,), F32).at[routing.experts.reshape(-1)].add(1.0)
        load = counts / counts.sum()
        self.router_load[...] = jax.lax.stop_gradient(load)
        if coef > 0:
            # Switch/DeepSeek sequence-agnostic balance loss: E * sum_e load_e * mean normalised score_e.
            probs = routing.scores / routing.scores.sum(-1, keepdims=True)
            self.aux_loss[...] = coef * e * jnp.sum(jax.lax.stop_gradient(load) * probs.mean(0))
