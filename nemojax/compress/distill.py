"""Knowledge distillation of logits (Minitron's retraining after pruning; QAD uses the same loss,
quant/qad.py): a frozen teacher, a student, and per token

    loss = kl_weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + ce_weight * CE(s, next token)

forward KL at temperature T = 1 by default, logits only (shared/research/quant_training.md §3, §6). With top_k > 0
the teacher distribution is cut to its k most likely tokens and renormalised there (the student's log-softmax is
still over the whole vocabulary), so a teacher's logits can be kept as k values and indices per token.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from nemojax.config import ConfigError, check_bounds

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    kl_weight: float = 1.0
    ce_weight: float = 0.0           # mix in the next-token cross entropy
    temperature: float = 1.0
    top_k: int = 0                   # > 0: distill the teacher's k most likely tokens only

    def __post_init__(self):
        check_bounds(self, "train.distill", 0.0, "kl_weight", "ce_weight", "top_k")
        check_bounds(self, "train.distill", 0.0, "temperature", strict=True)
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ConfigError("train.distill: kl_weight and ce_weight are both 0; nothing would be trained")


def logit_kl(teacher_logits: jax.Array, student_logits: jax.Array, mask: Optional[jax.Array] = None,
             temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Mean over counted tokens of T^2 * KL(p_teacher || p_student) at temperature T. logits [batch, seq, vocab];
    mask [batch, seq] (1 = counted); top_k > 0: the teacher's k largest logits only (module docstring)."""
    s = jax.nn.log_softmax(student_logits.astype(F32) / temperature, axis=-1)
    t_logits = teacher_logits.astype(F32) / temperature
    if top_k:
        t_logits, index = jax.lax.top_k(t_logits, top_k)
        s = jnp.take_along_axis(s, index, axis=-1)
    t = jax.nn.log_softmax(t_logits, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(F32)
    return jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)


def check_teacher(student_cfg, teacher_cfg, what: str = "train.distill_teacher") -> None:
    """A teacher's logits are compared token by token with the student's: the vocabularies must be the same."""
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ConfigError(f"{what} has vocab_size {teacher_cfg.vocab_size}, the student {student_cfg.vocab_size}: "
                          f"distillation compares logits over the same vocabulary")
