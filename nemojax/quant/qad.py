"""Quantization-aware distillation (quant_training.md §3, arXiv 2601.20088): a frozen high-precision teacher,
a student with NVFP4 fake-quantized linear layers (W4A4 forward, straight-through gradients) initialised from
the teacher's weights (= PTQ), trained on the per-token KL(p_teacher || p_student) of the logits only:
temperature 1 and no cross-entropy term: compress/distill.py with its defaults.
"""

from __future__ import annotations

from nemojax.compress.distill import logit_kl  # noqa: F401  (the loss; QAD is distillation into NVFP4)


def check_same_architecture(student_cfg, teacher_cfg) -> None:
    """QAD starts the student from the teacher's weights, so both must have the same architecture."""
    from nemojax.config import ConfigError

    a, b = student_cfg.to_hf_dict(), teacher_cfg.to_hf_dict()
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ConfigError("QAD teacher and the run's model differ in " + ", ".join(
            f"{k} ({b.get(k)!r} vs {a.get(k)!r})" for k in diff[:6]))
