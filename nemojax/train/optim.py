"""AdamW with the Megatron/Nemotron recipe (quant_training.md §7): betas (0.9, 0.95), eps 1e-8, weight decay 0.1
on matrices only (norms, A_log, D, dt_bias, biases and other 1-D parameters are not decayed), global-norm
clipping, warmup-stable-decay or cosine schedules, optional gradient accumulation."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import optax

from nemojax.config import ConfigError, check_bounds, check_choices


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    decay_fraction: float = 0.2       # WSD: share of the run spent decaying
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        check_choices(self, "train.optim")
        check_bounds(self, "train.optim", 0.0, "lr", "clip_norm", "eps", strict=True)
        check_bounds(self, "train.optim", 0, "warmup_steps", "weight_decay", "min_lr_ratio")
        check_bounds(self, "train.optim", 1, "grad_accum")
        check_bounds(self, "train.optim", 0.0, "b1", "b2", high=1.0)
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"train.optim.decay_fraction must be in [0, 1], got {self.decay_fraction!r}")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    rest = max(total_steps - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    else:                             # wsd
        decay = max(int(rest * cfg.decay_fraction), 1)
        after = optax.join_schedules([optax.constant_schedule(cfg.lr),
                                      optax.linear_schedule(cfg.lr, floor, decay)], [rest - decay])
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params):
    """True for parameters that get weight decay: those with 2 or more dimensions."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx
