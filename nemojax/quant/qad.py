"""Quantization-aware distillation (quant_training.md §3, arXiv 2601.20088): a frozen high-precision teacher,
a student with NVFP4 fake-quantized linear layers (W4A4 forward, straight-through gradients) initialised from
the teacher's weights (= PTQ), trained on the per-token KL(p_teacher || p_student) of the logits only:
temperature 1 and no cross-entropy term.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

F32 = jnp.float32


def logit_kl(teacher_logits: jax.Array, student_logits: jax.Array, mask: Optional[jax.Array] = None,
             temperature: float = 1.0) -> jax.Array:
    """Mean over counted tokens of T^2 * KL(softmax(t/T) || softmax(s/T)). logits [batch, seq, vocab];
    mask [batch, seq] (1 = counted)."""
    t = jax.nn.log_softmax(teacher_logits.astype(F32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(F32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(F32)
    return jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)


def check_same_architecture(student_cfg, teacher_cfg) -> None:
    """QAD starts the student from the teacher's weights, so both must have the same architecture."""
    from nemojax.config import ConfigError

    a, b = student_cfg.to_hf_dict(), teacher_cfg.to_hf_dict()
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ConfigError("QAD teacher and the run's model differ in " + ", ".join(
            f"{k} ({b.get(k)!r} vs {a.get(k)!r})" for k in diff[:6]))
