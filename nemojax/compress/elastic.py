"""Nemotron Elastic: one parent whose importance-ordered prefixes are nested submodels, a router that picks a
submodel's sizes for a parameter budget, and zero-shot extraction (shared/research/quant_training.md §6).

1. Sort. The parent is permuted into importance order (prune.sort_by_importance: the same function), so every
   submodel keeps a prefix of each axis: embedding channels, MLP neurons, Mamba heads of each B/C group, the
   experts of each routing group. Layers are skipped least important first by the normalized-MSE ranking
   (importance.depth_scores).
2. Masks. A submodel is the parent with 0/1 masks on those prefixes (the layers' `*_mask` attributes): a masked
   layer computes what the pruned layer computes (masked norms average over kept channels only, a masked expert
   is never routed to, a skipped layer passes its input through).
3. Router. one-hot(budget) -> per axis Linear -> LeakyReLU(0.1) -> Linear -> logits over that axis's allowed
   sizes -> hard Gumbel-softmax at temperature tau (annealed), straight-through: the forward uses one size per
   axis, the gradient reaches the router's probabilities through the masks.
4. Loss, per step and summed over the budgets: KL(frozen parent || submodel) + budget_weight * budget loss,
   where the budget loss is |Params(sampled sizes) / (budget * Params(parent)) - 1|, zero within `tolerance`,
   plus 10 * MSE(probabilities, the largest size) for budget 1. Params(sizes) counts every parameter through its
   logical axes, so it is exact for any discrete choice; it sees the straight-through one-hot choices, so its
   value is the sampled submodel's count and its gradient the expected count's (the paper counts the expected
   sizes, which lets a spread-out router meet the budget on average while its most likely submodel misses it).
5. Extract. The router's most likely sizes for a budget (no noise), cut from the trained parent as prefixes
   (prune.prefix_scores): a standalone model equal to the parent under that budget's masks.

The run is a nemojax model directory (the trained, sorted parent) with `elastic.json` (settings, allowed sizes,
layer ranking) and `router.safetensors` beside it. Per-layer (heterogeneous) widths are not produced: every layer
of a kind shares its axis's size, so extracted models are HF-exportable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.compress import prune as prune_lib
from nemojax.compress.distill import logit_kl
from nemojax.config import ConfigError, ModelConfig
from nemojax.model import NemotronH

F32 = jnp.float32
ELASTIC_FILE = "elastic.json"
ROUTER_FILE = "router.safetensors"
# axis -> the pattern character whose layers it shrinks ("" = every layer: the embedding)
AXES = {"hidden_size": "", "intermediate_size": "-", "mamba_num_heads": "M", "n_routed_experts": "E",
        "skip_layers": ""}


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """budgets: parameter fractions of the parent, each in (0, 1] (none: `nemojax train` trains no elastic run);
    fractions: the sizes each width axis may take, as fractions of the parent's (rounded to what the layer
    allows); max_skip: layers that may be skipped. learning_rate is `nemojax elastic train`'s (constant); under
    `nemojax train` the model follows train.optim. calib_batches: the training batches `nemojax train` scores
    importance on (the first ones of the training stream)."""
    budgets: tuple = (1.0, 0.75, 0.5)
    fractions: tuple = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
    axes: tuple = ("hidden_size", "intermediate_size", "mamba_num_heads", "n_routed_experts")
    max_skip: int = 0
    router_hidden: int = 32
    tau_init: float = 1.0
    tau_decay: float = 0.98
    tau_min: float = 0.1
    budget_weight: float = 1.0
    tolerance: float = 0.05
    learning_rate: float = 1e-3
    router_learning_rate: float = 5e-2
    calib_batches: int = 8

    def __post_init__(self):
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "axes", tuple(self.axes))
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ConfigError(f"elastic budget {b} is outside (0, 1]: a budget is a fraction of the parent's "
                                  f"parameters")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"elastic budgets {list(self.budgets)} must be distinct")
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ConfigError(f"elastic fractions {list(self.fractions)} must lie in (0, 1]")
        unknown = [a for a in self.axes if a not in AXES or a == "skip_layers"]
        if unknown:
            raise ConfigError(f"unknown elastic axes {unknown}; choose from "
                              f"{[a for a in AXES if a != 'skip_layers']}")
        if self.max_skip < 0 or self.router_hidden < 1 or self.calib_batches < 1:
            raise ConfigError("elastic max_skip must be >= 0, router_hidden and calib_batches >= 1")
        if not 0 < self.tau_min <= self.tau_init or not 0 < self.tau_decay <= 1:
            raise ConfigError("elastic temperatures need 0 < tau_min <= tau_init and 0 < tau_decay <= 1")


def _sizes(n: int, multiple: int, fractions: Sequence[float], least: int = 1) -> tuple[int, ...]:
    """Allowed sizes of an axis of n units in steps of `multiple`, at least `least`, largest first."""
    out = {max(least, multiple * max(1, round(f * n / multiple))) for f in fractions}
    return tuple(sorted((s for s in out if s <= n), reverse=True))


def _units(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{width axis: (units, groups)}: a submodel keeps the same prefix of every group's units."""
    return {"hidden_size": (cfg.hidden_size, 1), "intermediate_size": (cfg.intermediate_size, 1),
            "mamba_num_heads": (cfg.mamba_num_heads, cfg.n_groups),
            "n_routed_experts": (cfg.n_routed_experts, cfg.n_group)}


def choices(cfg: ModelConfig, ec: ElasticConfig) -> dict[str, tuple[int, ...]]:
    """{axis: allowed sizes, largest (the parent's) first} for the axes the model has."""
    kinds = set(cfg.pattern)
    out = {}
    for axis in ec.axes:
        if AXES[axis] and AXES[axis] not in kinds:
            continue
        n, groups = _units(cfg)[axis]
        least = 1
        if axis == "n_routed_experts":
            # a routing group keeps at least the two experts its group score sums (layers/moe.py route)
            least = max(cfg.num_experts_per_tok, groups * min(2, n // groups))
        out[axis] = _sizes(n, groups, ec.fractions, least)
    if ec.max_skip:
        if ec.max_skip >= cfg.num_layers:
            raise ConfigError(f"elastic max_skip={ec.max_skip} would leave no layer of {cfg.num_layers}")
        out["skip_layers"] = tuple(range(ec.max_skip + 1))
    return out


def check_model(cfg: ModelConfig) -> None:
    if cfg.num_nextn_predict_layers:
        raise ConfigError("elastic training covers the main model; this model has an MTP head "
                          "(num_nextn_predict_layers > 0)")
    if cfg.attn_qkv_norm and "*" in cfg.pattern:
        raise ConfigError("elastic embedding masks act on the blocks' pre-norms; attn_qkv_norm replaces the "
                          "attention block's pre-norm with one the masks do not reach")


# ------------------------------------------------------------------------------------------------ 3. router
class Router(nnx.Module):
    """one-hot(budget) [budgets] -> {axis: logits [allowed sizes]}: a 2-layer MLP per axis."""

    def __init__(self, n_budgets: int, sizes: dict, hidden: int, rngs: nnx.Rngs):
        self.axes = tuple(sizes)
        self.first = nnx.List([nnx.Linear(n_budgets, hidden, rngs=rngs) for _ in self.axes])
        self.second = nnx.List([nnx.Linear(hidden, len(sizes[a]), rngs=rngs) for a in self.axes])

    def __call__(self, onehot: jax.Array) -> dict[str, jax.Array]:
        return {a: second(jax.nn.leaky_relu(first(onehot), 0.1))
                for a, first, second in zip(self.axes, self.first, self.second)}


def gumbel_hard(logits: jax.Array, key: Optional[jax.Array], tau) -> tuple[jax.Array, jax.Array]:
    """(straight-through one-hot [C]: 0 / 1 values forward (the 1 to within a rounding), the gradient of the
    softmax at temperature tau; the router's probabilities [C]). key None: no noise (argmax of the logits)."""
    noisy = logits if key is None else logits - jnp.log(-jnp.log(jax.random.uniform(key, logits.shape, F32,
                                                                                         1e-20, 1.0)))
    soft = jax.nn.softmax(noisy / tau)
    hard = jax.nn.one_hot(jnp.argmax(noisy), logits.shape[-1], dtype=F32)
    # the 0 entries stay exactly 0 (s - s), the 1 entry is 1 to within a rounding; the gradient is the softmax's
    return hard + (soft - jax.lax.stop_gradient(soft)), jax.nn.softmax(logits)


# ------------------------------------------------------------------------------------------------- 2. masks
def _prefix(n: int, sizes: Sequence[int], groups: int = 1) -> np.ndarray:
    """[choices, n] 0/1: unit j kept under choice c when its index within its group is below size_c / groups."""
    within = np.arange(n) % (n // groups)
    return np.stack([within < s // groups for s in sizes]).astype(np.float32)


class Masker:
    """Turns per-axis choice weights into the layers' masks and sets them on a model of the parent's shape."""

    def __init__(self, cfg: ModelConfig, sizes: dict, skip_order: Sequence[int] = ()):
        self.cfg, self.sizes = cfg, sizes
        units = _units(cfg)
        self.prefix = {a: jnp.asarray(_prefix(units[a][0], sizes[a], units[a][1])) for a in sizes
                       if a != "skip_layers"}
        if "skip_layers" in sizes:
            if len(skip_order) != cfg.num_layers:
                raise ValueError(f"skip_order must rank all {cfg.num_layers} layers, got {len(skip_order)}")
            rank = np.empty(cfg.num_layers, np.int64)
            rank[np.asarray(skip_order)] = np.arange(cfg.num_layers)
            self.prefix["skip_layers"] = jnp.asarray(np.stack([rank < k for k in sizes["skip_layers"]]), F32)

    def masks(self, weights: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """{axis: weights [choices]} -> {axis: mask}: [hidden], [F], [mamba heads], [experts], [layers] kept."""
        out = {a: weights[a] @ self.prefix[a] for a in weights}
        if "skip_layers" in out:
            out["skip_layers"] = 1.0 - out["skip_layers"]
        return out

    def apply(self, model: NemotronH, masks: Optional[dict]) -> None:
        """Sets (masks) or clears (None) the mask attributes of the model's layers."""
        def var(axis, shape=None):
            if masks is None or axis not in masks:
                return None
            m = masks[axis]
            return nnx.Variable(m if shape is None else jnp.broadcast_to(m[:, None], shape))

        cfg = self.cfg
        model.embed_mask = var("hidden_size")
        for i, block in enumerate(model.layers):
            block.embed_mask = model.embed_mask
            block.layer_mask = None if masks is None or "skip_layers" not in masks else nnx.Variable(
                masks["skip_layers"][i])
            if block.kind == "-":
                block.mixer.neuron_mask = var("intermediate_size")
            elif block.kind == "M":
                block.mixer.channel_mask = var("mamba_num_heads", (cfg.mamba_num_heads, cfg.mamba_head_dim))
            elif block.kind == "E":
                block.mixer.expert_mask = var("n_routed_experts")


def hard_weights(sizes: dict, chosen: dict[str, int]) -> dict[str, jax.Array]:
    """{axis: one-hot [choices]} for the given sizes (each must be one of the allowed sizes)."""
    out = {}
    for axis, allowed in sizes.items():
        size = chosen.get(axis, allowed[0])
        if size not in allowed:
            raise ValueError(f"{axis}={size} is not an allowed elastic size {list(allowed)}")
        out[axis] = jax.nn.one_hot(allowed.index(size), len(allowed), dtype=F32)
    return out


# ----------------------------------------------------------------------------------------- 4. budget loss
class ParamCounter:
    """Parameters of the submodel as a function of per-axis size ratios and per-layer keep values: every
    parameter's size is the product of its dimensions, each scaled by its logical axis's ratio."""

    def __init__(self, model: NemotronH, sizes: dict):
        cfg = model.config
        scale = {"embed": "hidden_size", "norm": "hidden_size", "concat_embed": "hidden_size"}
        if not cfg.moe_latent_size:
            scale["expert_embed"] = "hidden_size"
        by_kind = {"-": {"mlp": "intermediate_size"}, "M": {"mamba_heads": "mamba_num_heads"},
                   "E": {"experts": "n_routed_experts", "router": "n_routed_experts"}}
        self.terms = []                       # (count, {axis: exponent}, layer or None)
        for path, var in nnx.state(model, nnx.Param).flat_state():
            axes = var.get_metadata().get("logical_axes") or ()
            layer = path[1] if path[0] == "layers" else None
            kind = cfg.pattern[layer] if layer is not None else ""
            rules = {**scale, **by_kind.get(kind, {})}
            exps: dict = {}
            for name in axes:
                axis = rules.get(name)
                if axis in sizes:
                    exps[axis] = exps.get(axis, 0) + 1
            self.terms.append((int(np.prod(var.get_value().shape)), exps, layer))
        self.full = sum(t[0] for t in self.terms)
        self.sizes = sizes

    def __call__(self, ratios: dict, keep: Optional[jax.Array] = None) -> jax.Array:
        total = jnp.zeros((), F32)
        for count, exps, layer in self.terms:
            term = jnp.asarray(count, F32)
            for axis, e in exps.items():
                term = term * ratios[axis] ** e
            if keep is not None and layer is not None:
                term = term * keep[layer]
            total = total + term
        return total

    def of(self, probs: dict, skip_prefix: Optional[jax.Array] = None) -> jax.Array:
        """Expected parameters under per-axis probabilities [choices] (sizes at their expected values)."""
        ratios = {a: probs[a] @ jnp.asarray(self.sizes[a], F32) / self.sizes[a][0] for a in probs
                  if a != "skip_layers"}
        keep = None if skip_prefix is None or "skip_layers" not in probs else 1.0 - probs["skip_layers"] @ skip_prefix
        return self(ratios, keep)


def budget_loss(counter: ParamCounter, weights: dict, probs: dict, budget: float, tolerance: float,
                skip_prefix: Optional[jax.Array] = None) -> jax.Array:
    """weights: the straight-through one-hot choices (the count is the sampled submodel's, exactly; the gradient
    is the expected count's); probs: the router's probabilities (the full budget's pull to the largest sizes)."""
    diff = jnp.abs(counter.of(weights, skip_prefix) / (budget * counter.full) - 1.0)
    loss = jnp.where(diff < tolerance, 0.0, diff)
    if budget == 1.0:            # the full budget is the parent: push every axis to its largest size
        loss = loss + 10.0 * sum(jnp.mean((p - jax.nn.one_hot(0, p.shape[-1])) ** 2) for p in probs.values())
    return loss


# -------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class ElasticRun:
    """A trained parent (sorted), its router and settings."""
    model: NemotronH
    router: Router
    config: ElasticConfig
    sizes: dict
    skip_order: tuple = ()

    @property
    def masker(self) -> Masker:
        return Masker(self.model.config, self.sizes, self.skip_order)

    def chosen(self, budget: float) -> dict[str, int]:
        """The router's most likely size per axis for `budget` (one of the run's budgets)."""
        if budget not in self.config.budgets:
            raise ValueError(f"budget {budget} is not one of the run's budgets {list(self.config.budgets)}; the "
                             f"router was trained for those")
        onehot = jax.nn.one_hot(self.config.budgets.index(budget), len(self.config.budgets), dtype=F32)
        logits = self.router(onehot)
        return {a: self.sizes[a][int(jnp.argmax(logits[a]))] for a in self.sizes}

    def targets(self, chosen: dict[str, int]) -> prune_lib.Targets:
        widths = {a: s for a, s in chosen.items() if a != "skip_layers"}
        skip = chosen.get("skip_layers", 0)
        return prune_lib.Targets(**widths, drop_layers=tuple(sorted(int(i) for i in self.skip_order[:skip])))

    def masked(self, chosen: dict[str, int]) -> None:
        """Sets the masks of those sizes on the run's model (clear with `unmasked`)."""
        m = self.masker
        m.apply(self.model, m.masks(hard_weights(self.sizes, chosen)))

    def unmasked(self) -> None:
        self.masker.apply(self.model, None)

    def extract(self, budget: float) -> NemotronH:
        """The standalone submodel the router picks for `budget` (module docstring, step 5)."""
        return self.extract_sizes(self.chosen(budget))

    def extract_sizes(self, chosen: dict[str, int]) -> NemotronH:
        hard_weights(self.sizes, chosen)                                    # allowed sizes only
        return prune_lib.prune(self.model, prune_lib.prefix_scores(self.model.config), self.targets(chosen))

    # ------------------------------------------------------------------ files
    def save(self, directory: str, force: bool = False, tokenizer_from: Optional[str] = None) -> None:
        from safetensors.numpy import save_file

        from nemojax.convert.orbax import save_orbax

        def extra(tmp):
            meta = {"config": dataclasses.asdict(self.config), "sizes": self.sizes,
                    "skip_order": [int(i) for i in self.skip_order]}
            with open(os.path.join(tmp, ELASTIC_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            flat = {".".join(map(str, p)): np.asarray(v.get_value())
                    for p, v in nnx.state(self.router, nnx.Param).flat_state()}
            save_file(flat, os.path.join(tmp, ROUTER_FILE))

        save_orbax(self.model, directory, force=force, tokenizer_from=tokenizer_from, extra=extra)

    @classmethod
    def load(cls, directory: str) -> "ElasticRun":
        from safetensors.numpy import load_file

        from nemojax.convert.orbax import load_orbax

        meta_file = os.path.join(directory, ELASTIC_FILE)
        if not os.path.isfile(meta_file):
            raise ValueError(f"{directory} is not an elastic run (no {ELASTIC_FILE}); train one with "
                             f"`nemojax elastic train`")
        with open(meta_file) as f:
            meta = json.load(f)
        ec = ElasticConfig(**meta["config"])
        sizes = {a: tuple(int(s) for s in v) for a, v in meta["sizes"].items()}
        model = load_orbax(directory)
        router = Router(len(ec.budgets), sizes, ec.router_hidden, nnx.Rngs(0))
        values = load_file(os.path.join(directory, ROUTER_FILE))
        state = nnx.state(router, nnx.Param)
        for path, var in state.flat_state():
            var.set_value(jnp.asarray(values[".".join(map(str, path))]))
        nnx.update(router, state)
        return cls(model, router, ec, sizes, tuple(meta["skip_order"]))


# --------------------------------------------------------------------------------------------- training
def start(parent: NemotronH, scores, ec: ElasticConfig, seed: int = 0) -> ElasticRun:
    """Step 1: the parent sorted by `scores` (importance.collect; with max_skip also importance.depth_scores'
    'depth/nmse') and a fresh router."""
    cfg = parent.config
    if not ec.budgets:
        raise ConfigError("elastic training needs at least one budget")
    check_model(cfg)
    sizes = choices(cfg, ec)
    skip_order: tuple = ()
    if ec.max_skip:
        skip_order = tuple(int(i) for i in prune_lib.rank_layers(scores, cfg.num_layers, "nmse"))
    model = prune_lib.sort_by_importance(parent, scores)
    return ElasticRun(model, Router(len(ec.budgets), sizes, ec.router_hidden, nnx.Rngs(seed)), ec, sizes,
                      skip_order)


def objective(run: ElasticRun, graphdef, rest, r_graphdef, counter: Optional[ParamCounter] = None):
    """Step 4's loss: fn(params, router_params, teacher_logits, inputs, key, tau) -> (total, metrics), summed over
    the run's budgets; params / rest: nnx.split(model, nnx.Param, ...) of the run's model (each budget's student
    is merged afresh from them, so masks never reach the caller's model), router_params of its router."""
    ec, masker = run.config, run.masker
    counter = counter or ParamCounter(run.model, run.sizes)
    skip_prefix = masker.prefix.get("skip_layers")
    onehots = jnp.eye(len(ec.budgets), dtype=F32)

    def loss(params, r_params, t_logits, inputs, key, tau):
        router = nnx.merge(r_graphdef, r_params)
        total, metrics = 0.0, {}
        for i, budget in enumerate(ec.budgets):
            logits = router(onehots[i])
            keys = jax.random.split(jax.random.fold_in(key, i), len(logits))
            picked = {a: gumbel_hard(logits[a], k, tau) for a, k in zip(logits, keys)}
            weights, probs = ({a: v[j] for a, v in picked.items()} for j in (0, 1))     # see budget_loss
            # the forward writes router statistics: each merge gets its own copy of the non-parameter variables
            student = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
            masker.apply(student, masker.masks(weights))
            kd = logit_kl(t_logits, student(inputs))
            bl = budget_loss(counter, weights, probs, budget, ec.tolerance, skip_prefix)
            total = total + kd + ec.budget_weight * bl
            metrics[f"kd@{budget:g}"], metrics[f"budget_loss@{budget:g}"] = kd, bl
            metrics[f"params@{budget:g}"] = counter.of(weights, skip_prefix) / counter.full
        return total, metrics

    return loss


def tau_at(ec: ElasticConfig, step: int) -> float:
    """The Gumbel-softmax temperature of step `step` (0-based): tau_init * tau_decay^step, at least tau_min."""
    return max(ec.tau_min, ec.tau_init * ec.tau_decay ** step)


def train(run: ElasticRun, batches: Iterable[np.ndarray], steps: int, seed: int = 0,
          log=None) -> list[dict]:
    """Step 4 on one device (`nemojax elastic train`; `nemojax train` with train.elastic.budgets runs the same
    objective through the Trainer, `trainer_step`): `steps` AdamW steps on the run's model and router against
    the frozen starting model, every budget in every step; batches [b, seq + 1] int32 cycle. Returns per-step
    metrics."""
    import optax

    ec = run.config
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    r_graphdef, r_params = nnx.split(run.router, nnx.Param)
    teacher = jax.tree.map(jnp.copy, params)
    loss_fn = objective(run, graphdef, rest, r_graphdef)
    opt = optax.multi_transform(
        {"model": optax.adamw(ec.learning_rate, weight_decay=0.0),
         "router": optax.adam(ec.router_learning_rate)}, {"model": "model", "router": "router"})
    state = {"model": params, "router": r_params}
    opt_state = opt.init(state)

    @jax.jit
    def step(state, opt_state, teacher, rest, tokens, key, tau):
        inputs = tokens[:, :-1]
        t_logits = jax.lax.stop_gradient(nnx.merge(graphdef, teacher, jax.tree.map(lambda v: v, rest))(inputs))
        (loss, metrics), grads = jax.value_and_grad(
            lambda st: loss_fn(st["model"], st["router"], t_logits, inputs, key, tau), has_aux=True)(state)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, dict(metrics, loss=loss)

    batches = [jnp.asarray(b) for b in batches]
    if not batches:
        raise ValueError("no training batches")
    history, key = [], jax.random.key(seed)
    for s in range(steps):
        tau = tau_at(ec, s)
        state, opt_state, metrics = step(state, opt_state, teacher, rest, batches[s % len(batches)],
                                         jax.random.fold_in(key, s), jnp.float32(tau))
        row = {k: float(v) for k, v in metrics.items()} | {"step": s + 1, "tau": tau}
        history.append(row)
        if log is not None:
            log(row)
    nnx.update(run.model, state["model"])
    nnx.update(run.router, state["router"])
    return history


def trainer_step(run: ElasticRun, lr_schedule, seed: int = 0):
    """The Trainer's step for train.elastic.budgets: step(model, opt, router, router_opt, tokens, teacher,
    step, tau) -> metrics, updating model / opt (nnx.Optimizer, the run's train.optim) and router / router_opt
    (Adam at router_learning_rate) in place; teacher: the frozen sorted parent (a NemotronH). The model and its
    optimizer state are donated, as in the plain train step."""
    import optax

    counter = ParamCounter(run.model, run.sizes)

    def step(model, opt, router, router_opt, tokens, teacher, step, tau):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        r_graphdef, r_params = nnx.split(router, nnx.Param)
        loss_fn = objective(run, graphdef, rest, r_graphdef, counter)
        inputs = tokens[:, :-1]
        t_logits = jax.lax.stop_gradient(teacher(inputs))
        key = jax.random.fold_in(jax.random.key(seed), step)
        (loss, metrics), (grads, r_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            params, r_params, t_logits, inputs, key, tau)
        opt.update(model, grads)
        router_opt.update(router, r_grads)
        return dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_schedule(opt.step[...] - 1),
                    tau=tau)

    return nnx.jit(step, donate_argnums=(0, 1))


def expected_params(run: ElasticRun, chosen: dict[str, int]) -> float:
    """Parameters of the submodel of those sizes, counted without building it (as the budget loss counts)."""
    counter = ParamCounter(run.model, run.sizes)
    return float(counter.of(hard_weights(run.sizes, chosen), run.masker.prefix.get("skip_layers")))


__all__ = ["ElasticConfig", "ElasticRun", "Masker", "ParamCounter", "Router", "budget_loss", "choices", "start",
           "train", "trainer_step", "objective", "tau_at", "expected_params", "gumbel_hard", "hard_weights"]
