"""Structured pruning by importance (Minitron, Minitron-SSM; shared/research/quant_training.md §6).

Every parameter declares its logical axes (layers/common.py), and pruning is one rule per logical axis: a
`Selection` maps (logical axis, dimension size) to the indices kept along it, and `_slice` applies it to every
dimension of every parameter. Global selections (embedding channels on 'embed', hidden-size norms, the MTP
'concat_embed') apply everywhere; per-layer ones (MLP neurons, attention heads, Mamba heads and channels,
experts and their neurons) to their own layer. Kept indices are ordered by importance, most important first,
so any prefix of a pruned axis is itself the best choice of that size (Nemotron Elastic's nested submodels).

    embedding   'embed', 'norm' [hidden], 'expert_embed' (without a latent projection), 'concat_embed' [2 hidden]
    MLP         'mlp'                  neurons by score (MoE shared experts are kept whole)
    attention   'kv_heads', 'heads'    whole KV groups ranked by the L2 of their heads' scores, then query heads
                                       ranked within each kept group (GQA stays valid: H / KV heads per group)
    Mamba       'mamba_heads' [H * P]  group-aware (Minitron-SSM): head-dim channels by the L2 over heads of the
                'mamba_heads' [H]      x-projection score, the same channels in every head; then the same number
                                       of heads in every B/C group, ranked within the group by the L2 of their
                                       kept channels. B, C and their convolutions ('ssm_groups') are untouched.
    MoE         'experts', 'router'    experts by routing-weighted output norm (within each routing group when
                'expert_mlp'           n_group > 1); each kept expert keeps its own most active neurons
Depth pruning drops whole layers and rewrites the pattern.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.compress.importance import Scores
from nemojax.config import ConfigError, ModelConfig
from nemojax.model import PERSISTENT, NemotronH, abstract_model, materialize


@dataclasses.dataclass(frozen=True)
class Targets:
    """Sizes to prune to (None: keep) and main-model layers to drop (indices)."""
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    mamba_num_heads: Optional[int] = None
    mamba_head_dim: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    n_routed_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    drop_layers: tuple[int, ...] = ()

    WIDTHS = ("hidden_size", "intermediate_size", "mamba_num_heads", "mamba_head_dim", "num_attention_heads",
              "num_key_value_heads", "n_routed_experts", "moe_intermediate_size")

    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in self.WIDTHS if getattr(self, k) is not None}


_NEEDS = {"intermediate_size": "-", "mamba_num_heads": "M", "mamba_head_dim": "M", "num_attention_heads": "*",
          "num_key_value_heads": "*", "n_routed_experts": "E", "moe_intermediate_size": "E"}


def _kinds(cfg: ModelConfig) -> str:
    return cfg.pattern + (cfg.mtp_pattern if cfg.num_nextn_predict_layers else "")


def pruned_config(cfg: ModelConfig, targets: Targets) -> ModelConfig:
    """The config of the pruned model; one clear error for a target the model cannot be pruned to."""
    kinds = _kinds(cfg)
    for name, value in targets.sizes().items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if name in _NEEDS and _NEEDS[name] not in kinds:
            raise ConfigError(f"target {name}: the model has no {_NEEDS[name]!r} layers (pattern {cfg.pattern!r})")
        if value > getattr(cfg, name):
            raise ConfigError(f"target {name}={value} is larger than the model's {getattr(cfg, name)}; pruning "
                              f"only removes")
    heads = targets.mamba_num_heads
    if heads is not None and heads % cfg.n_groups:
        raise ConfigError(f"target mamba_num_heads={heads} is not divisible by n_groups={cfg.n_groups}: "
                          f"group-aware pruning keeps the same number of heads in every B/C group")
    kv = targets.num_key_value_heads or cfg.num_key_value_heads
    q = targets.num_attention_heads or (cfg.num_attention_heads // cfg.num_key_value_heads * kv)
    if "*" in kinds and (q % kv or q // kv > cfg.num_attention_heads // cfg.num_key_value_heads):
        raise ConfigError(f"target num_attention_heads={q} with {kv} key/value heads: query heads are pruned "
                          f"within KV groups, so it must be a multiple of {kv} and at most "
                          f"{cfg.num_attention_heads // cfg.num_key_value_heads * kv}")
    experts = targets.n_routed_experts
    if experts is not None and experts < cfg.num_experts_per_tok:
        raise ConfigError(f"target n_routed_experts={experts} is below num_experts_per_tok={cfg.num_experts_per_tok}")
    if experts is not None and experts % cfg.n_group:
        raise ConfigError(f"target n_routed_experts={experts} is not divisible by the router's n_group={cfg.n_group}")
    drop = targets.drop_layers
    if len(set(drop)) != len(drop) or any(not isinstance(i, int) or not 0 <= i < cfg.num_layers for i in drop):
        raise ConfigError(f"drop_layers {list(drop)} must be distinct layer indices in [0, {cfg.num_layers})")
    if len(drop) >= cfg.num_layers:
        raise ConfigError(f"dropping {len(drop)} of {cfg.num_layers} layers leaves none")
    changes = dict(targets.sizes())
    if "num_attention_heads" not in changes and "num_key_value_heads" in changes and "*" in kinds:
        changes["num_attention_heads"] = q
    if drop:
        changes["pattern"] = "".join(c for i, c in enumerate(cfg.pattern) if i not in set(drop))
    return cfg.replace(**changes)


# ---------------------------------------------------------------------------------------------- selections
Selection = dict  # {(logical axis, dimension size): kept indices [k] (or [experts, k] for 'expert_mlp')}


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, largest first (stable: ties keep their order)."""
    return np.argsort(-np.asarray(score, np.float64), kind="stable")[:k].astype(np.int64)


def _top_per_group(score: np.ndarray, groups: int, k_per_group: int) -> np.ndarray:
    """The k largest of each of `groups` contiguous groups, group by group, largest first within each."""
    size = len(score) // groups
    return np.concatenate([g * size + _top(score[g * size:(g + 1) * size], k_per_group) for g in range(groups)])


def mamba_selection(x_score: np.ndarray, groups: int, heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Group-aware choice from the x-projection scores [H, P]: (kept heads [heads], kept channels [head_dim])."""
    channels = _top(np.sqrt(np.sum(x_score ** 2, axis=0)), head_dim)
    head_score = np.sqrt(np.sum(x_score[:, channels] ** 2, axis=1))
    return _top_per_group(head_score, groups, heads // groups), channels


def attention_selection(head_score: np.ndarray, kv_heads: int, new_kv: int, new_heads: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(kept KV groups [new_kv], kept query heads [new_heads], group by group) from head scores [H]."""
    per = len(head_score) // kv_heads
    by_group = head_score.reshape(kv_heads, per)
    groups = _top(np.sqrt(np.sum(by_group ** 2, axis=1)), new_kv)
    heads = np.concatenate([g * per + _top(by_group[g], new_heads // new_kv) for g in groups])
    return groups, heads


def _flat(units: np.ndarray, width: int, inner: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices into a flattened [units, width] axis: the kept units, each with its kept `inner` columns."""
    inner = np.arange(width) if inner is None else inner
    return (units[:, None] * width + inner[None, :]).reshape(-1)


def layer_selection(kind: str, unit: tuple, cfg: ModelConfig, new: ModelConfig, scores: Scores,
                    sort: bool = False) -> Selection:
    """The layer's kept indices per axis; with sort, also for axes kept whole (in importance order)."""
    sel: Selection = {}
    if kind == "-" and (sort or new.intermediate_size != cfg.intermediate_size):
        sel[("mlp", cfg.intermediate_size)] = _top(np.sqrt(scores.get(unit, "neurons")), new.intermediate_size)
    elif kind == "*" and (sort or (new.num_attention_heads, new.num_key_value_heads) != (
            cfg.num_attention_heads, cfg.num_key_value_heads)):
        groups, heads = attention_selection(np.sqrt(scores.get(unit, "heads")), cfg.num_key_value_heads,
                                            new.num_key_value_heads, new.num_attention_heads)
        sel[("heads", cfg.num_attention_heads * cfg.head_dim)] = _flat(heads, cfg.head_dim)
        sel[("kv_heads", cfg.num_key_value_heads * cfg.head_dim)] = _flat(groups, cfg.head_dim)
    elif kind == "M" and (sort or (new.mamba_num_heads, new.mamba_head_dim) != (cfg.mamba_num_heads,
                                                                                 cfg.mamba_head_dim)):
        heads, channels = mamba_selection(np.sqrt(scores.get(unit, "x")), cfg.n_groups, new.mamba_num_heads,
                                          new.mamba_head_dim)
        sel[("mamba_heads", cfg.mamba_num_heads)] = heads
        sel[("mamba_heads", cfg.mamba_inner)] = _flat(heads, cfg.mamba_head_dim, channels)
    elif kind == "E":
        experts = np.arange(cfg.n_routed_experts)
        if sort or new.n_routed_experts != cfg.n_routed_experts:
            experts = _top_per_group(scores.get(unit, "expert_output"), cfg.n_group,
                                     new.n_routed_experts // cfg.n_group)
            sel[("experts", cfg.n_routed_experts)] = sel[("router", cfg.n_routed_experts)] = experts
        if sort or new.moe_intermediate_size != cfg.moe_intermediate_size:
            neurons = scores.get(unit, "expert_neurons")[experts]
            sel[("expert_mlp", cfg.moe_intermediate_size)] = np.stack([_top(n, new.moe_intermediate_size)
                                                                       for n in neurons])
    return sel


def embed_selection(cfg: ModelConfig, new: ModelConfig, scores: Scores, sort: bool = False) -> Selection:
    if new.hidden_size == cfg.hidden_size and not sort:
        return {}
    d = cfg.hidden_size
    keep = _top(scores.embed(), new.hidden_size)
    sel = {("embed", d): keep, ("norm", d): keep, ("concat_embed", 2 * d): np.concatenate([keep, d + keep])}
    if not cfg.moe_latent_size:
        sel[("expert_embed", d)] = keep
    return sel


def _slice(value: np.ndarray, axes: Sequence, sel: Selection) -> np.ndarray:
    for dim, name in enumerate(axes):
        idx = sel.get((name, value.shape[dim]))
        if idx is None:
            continue
        if idx.ndim == 2:            # per expert: rows follow the (already sliced) experts axis 0
            shape = [1] * value.ndim
            shape[0], shape[dim] = idx.shape
            value = np.take_along_axis(value, idx.reshape(shape), axis=dim)
        else:
            value = np.take(value, idx, axis=dim)
    return value


def _unit(path: tuple) -> Optional[tuple]:
    """The block a parameter belongs to: its path up to the mixer (None outside blocks)."""
    return tuple(path[:path.index("mixer")]) if "mixer" in path else None


def _kind(cfg: ModelConfig, unit: tuple) -> str:
    return (cfg.pattern if unit[0] == "layers" else cfg.mtp_pattern)[unit[-1]]


def prune(model: NemotronH, scores: Optional[Scores], targets: Targets, sort: bool = False) -> NemotronH:
    """A new model pruned to `targets` by `scores` (importance.collect on this model; None only for depth
    pruning alone): every parameter sliced along its logical axes (module docstring), dropped layers removed.
    With sort, axes kept whole are permuted into importance order too (the same function, every prefix the
    most important units: Nemotron Elastic's starting point)."""
    cfg = model.config
    new = pruned_config(cfg, targets)
    if (targets.sizes() or sort) and scores is None:
        raise ValueError("width pruning needs importance scores (compress.importance.collect)")
    global_sel = embed_selection(cfg, new, scores, sort) if scores is not None else {}
    drop = set(targets.drop_layers)
    renumber = {old: i for i, old in enumerate(j for j in range(cfg.num_layers) if j not in drop)}
    selections: dict[tuple, Selection] = {}
    values = {}
    for path, var in nnx.state(model, PERSISTENT).flat_state():
        if path[0] == "layers" and path[1] in drop:
            continue
        axes = var.get_metadata().get("logical_axes")
        value = np.asarray(var.get_value())
        unit = _unit(path)
        sel = global_sel
        if unit is not None and scores is not None and (targets.sizes() or sort):
            if unit not in selections:
                selections[unit] = layer_selection(_kind(cfg, unit), unit, cfg, new, scores, sort)
            sel = {**global_sel, **selections[unit]}
        if axes is not None:
            value = _slice(value, axes, sel)
        if path[0] == "layers":
            path = ("layers", renumber[path[1]]) + tuple(path[2:])
        values[path] = jnp.asarray(value)
    graphdef, state = abstract_model(new)
    expected = {p: v.get_value().shape for p, v in state.flat_state()}
    wrong = [(p, values[p].shape, s) for p, s in expected.items() if p in values and values[p].shape != s]
    if wrong:
        raise AssertionError(f"pruning produced wrong shapes, e.g. {wrong[0]}")
    return materialize(graphdef, state, values)


def sort_by_importance(model: NemotronH, scores: Scores) -> NemotronH:
    """The same model with every prunable axis in importance order (prune with sort, nothing removed)."""
    return prune(model, scores, Targets(), sort=True)


def prefix_scores(cfg: ModelConfig) -> Scores:
    """Scores that rank every unit by its index, first most important: pruning by them keeps prefixes (of each
    group where pruning is per group), which is how a model already in importance order is cut down."""
    from nemojax.compress.importance import architecture

    def desc(n):
        return np.arange(n, 0, -1, dtype=np.float64)

    stats = {"layers/0/embed": desc(cfg.hidden_size) ** 2}
    if cfg.num_nextn_predict_layers:
        raise ValueError("prefix scores cover the main model's layers; this model has an MTP head")
    for i, kind in enumerate(cfg.pattern):
        key = f"layers/{i}/mixer"
        if kind == "-":
            stats[f"{key}/neurons"] = desc(cfg.intermediate_size) ** 2
        elif kind == "*":
            stats[f"{key}/heads"] = desc(cfg.num_attention_heads) ** 2
        elif kind == "M":
            stats[f"{key}/x"] = np.outer(desc(cfg.mamba_num_heads), desc(cfg.mamba_head_dim)) ** 2
        elif kind == "E":
            stats[f"{key}/expert_output"] = desc(cfg.n_routed_experts)
            stats[f"{key}/expert_neurons"] = np.tile(desc(cfg.moe_intermediate_size), (cfg.n_routed_experts, 1))
    return Scores(stats, 0, architecture(cfg))


def drop_layers(model: NemotronH, layers: Sequence[int]) -> NemotronH:
    """The model without the given main-model layers (depth pruning; no scores needed)."""
    return prune(model, None, Targets(drop_layers=tuple(int(i) for i in layers)))


def rank_layers(scores: Scores, n_layers: int, metric: str = "loss") -> np.ndarray:
    """Main-model layers from least to most important by 'loss' (LM-loss increase when dropped), 'nmse'
    (normalized logit MSE when dropped) or 'bi' (block importance 1 - cos)."""
    if metric == "bi":
        score = scores.block_importance(n_layers)
    elif f"depth/{metric}" in scores.stats:
        score = np.asarray(scores.stats[f"depth/{metric}"], np.float64)
    else:
        raise ValueError(f"depth metric {metric!r} needs depth scores (importance.depth_scores); available: "
                         f"{sorted(k for k in scores.stats if k.startswith('depth/'))} and 'bi'")
    return np.argsort(score, kind="stable")
