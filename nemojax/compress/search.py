"""Architecture search within a budget (Minitron / MiniPuzzle style; shared/research/quant_training.md §6).

Candidates are combinations of target sizes, each axis at a few fractions of the parent's size (embedding
channels, MLP neurons, Mamba heads in whole groups, routed experts) and a number of least important layers dropped
(ranked as `nemojax prune --drop-layers K` ranks them). Those whose parameter count (or active parameters per token,
for MoE budgets) lies within `band` below the budget are kept, the closest to the budget first; each of the first
`limit` is pruned from the parent's importance scores, distilled from the parent for a few steps (the same
trainer and loss as `train.distill_teacher`), and ranked by its validation loss.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from typing import Callable, Optional

from nemojax.compress.importance import Scores
from nemojax.compress.prune import Targets, pruned_config, rank_layers
from nemojax.config import ModelConfig
from nemojax.convert.hf import active_param_count, param_count

FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclasses.dataclass(frozen=True)
class Candidate:
    targets: Targets
    config: ModelConfig
    params: int
    active_params: int
    loss: Optional[float] = None          # validation loss after the short distillation

    def row(self) -> dict:
        return {"loss": self.loss, "params": self.params, "active_params": self.active_params,
                **self.targets.sizes(), "drop_layers": list(self.targets.drop_layers)}


def _sizes(full: int, multiple: int = 1, floor: int = 1) -> list[int]:
    out = []
    for f in FRACTIONS:
        size = max(floor, int(round(full * f / multiple)) * multiple)
        if size not in out and size <= full:
            out.append(size)
    return out


def check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise ValueError(f"the budget must be a fraction in (0, 1], got {budget}")


def candidates(cfg: ModelConfig, scores: Scores, budget: float, active: bool = False, band: float = 0.1,
               max_drop: float = 0.25, depth_metric: str = "bi") -> list[Candidate]:
    """Every combination whose (active) parameter count is within [budget - band, budget] of the parent's, the
    closest to the budget first. budget is a fraction in (0, 1]."""
    check_budget(budget)
    count = active_param_count if active else param_count
    full = count(cfg)
    kinds = cfg.pattern
    axes = {"hidden_size": _sizes(cfg.hidden_size, 8 if cfg.hidden_size % 8 == 0 else 1)}
    if "-" in kinds:
        axes["intermediate_size"] = _sizes(cfg.intermediate_size, 8 if cfg.intermediate_size % 8 == 0 else 1)
    if "M" in kinds:
        axes["mamba_num_heads"] = _sizes(cfg.mamba_num_heads, cfg.n_groups, cfg.n_groups)
    if "E" in kinds:
        axes["n_routed_experts"] = [e for e in _sizes(cfg.n_routed_experts, cfg.n_group, cfg.n_group)
                                    if e >= cfg.num_experts_per_tok]
    order = list(rank_layers(scores, cfg.num_layers, depth_metric))
    drops = range(0, int(max_drop * cfg.num_layers) + 1)
    out = []
    for values in itertools.product(*axes.values(), drops):
        sizes = {k: v for k, v in zip(axes, values[:-1]) if v != getattr(cfg, k)}
        targets = Targets(**sizes, drop_layers=tuple(sorted(int(i) for i in order[:values[-1]])))
        new = pruned_config(cfg, targets)
        params = count(new)
        if budget - band <= params / full <= budget:
            out.append(Candidate(targets, new, param_count(new), active_param_count(new)))
    return sorted(out, key=lambda c: -(c.active_params if active else c.params))


def distilled_loss(parent, parent_dir: str, scores: Scores, candidate: Candidate, train_cfg, work_dir: str) -> float:
    """The candidate pruned from the parent (the model loaded from parent_dir), distilled from it
    (train.distill_teacher) under `train_cfg` (a TrainConfig: steps, data, optimizer); its final validation loss."""
    from nemojax.compress.prune import prune
    from nemojax.convert.orbax import save_orbax
    from nemojax.train.trainer import Trainer

    student_dir = os.path.join(work_dir, "student")
    save_orbax(prune(parent, scores, candidate.targets), student_dir)
    cfg = dataclasses.replace(train_cfg, distill_teacher=os.path.abspath(parent_dir), init_from=student_dir,
                              ckpt_dir=os.path.join(work_dir, "run"))
    history = Trainer(candidate.config, cfg).run(progress=False)
    return float(next(r["val_loss"] for r in reversed(history) if "val_loss" in r))


def search(parent, parent_dir: str, scores: Scores, budget: float, train_cfg, active: bool = False,
           limit: int = 4, band: float = 0.1, depth_metric: str = "bi",
           log: Callable[[str], None] = lambda _: None) -> list[Candidate]:
    """Scores the first `limit` candidates (closest to the budget) by distilled validation loss; returns them
    ranked, best first."""
    cfg = parent.config
    found = candidates(cfg, scores, budget, active, band, depth_metric=depth_metric)
    if not found:
        raise ValueError(f"no candidate architecture has {'active ' if active else ''}parameters within "
                         f"[{budget - band:.2f}, {budget:.2f}] of the model's; widen the budget")
    ranked = []
    for i, cand in enumerate(found[:limit]):
        with tempfile.TemporaryDirectory(prefix="nemojax-search-") as work:
            loss = distilled_loss(parent, parent_dir, scores, cand, train_cfg, work)
        ranked.append(dataclasses.replace(cand, loss=loss))
        log(f"candidate {i + 1}/{min(limit, len(found))}: {cand.row()} -> loss {loss:.4f}")
    return sorted(ranked, key=lambda c: c.loss)


def table(ranked: list[Candidate]) -> str:
    """The ranked candidates as a markdown table."""
    keys = sorted({k for c in ranked for k in c.targets.sizes()})
    head = ["rank", "val loss", "params", "active params", *keys, "dropped layers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, c in enumerate(ranked, 1):
        sizes = c.targets.sizes()
        cells = [str(i), f"{c.loss:.4f}", f"{c.params:,}", f"{c.active_params:,}",
                 *(str(sizes.get(k, "-")) for k in keys), str(list(c.targets.drop_layers) or "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
