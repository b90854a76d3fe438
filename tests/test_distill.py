"""Distillation (issue 15, item 3): train.distill_teacher trains the run's model (e.g. a pruned one, through
train.init_from) on a frozen teacher's logits; the loss is checked against a float64 numpy KL, top-k against its
own numpy definition, and a teacher of another vocabulary is one error before anything is written."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import make

from nemojax.compress import importance, prune
from nemojax.compress.distill import DistillConfig, logit_kl
from nemojax.config import ConfigError
from nemojax.convert.orbax import save_orbax
from nemojax.model import PERSISTENT
from nemojax.train.trainer import make_train_step


def numpy_kl(teacher, student, temperature=1.0, top_k=0):
    t = teacher.astype(np.float64) / temperature
    s = student.astype(np.float64) / temperature
    s = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    if top_k:
        index = np.argsort(-t, axis=-1, kind="stable")[..., :top_k]
        t, s = np.take_along_axis(t, index, -1), np.take_along_axis(s, index, -1)
    t = t - t.max(-1, keepdims=True)
    t = t - np.log(np.exp(t).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(t) * (t - s), -1)) * temperature ** 2)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (2.0, 0), (1.0, 5)])
def test_logit_kl_equals_numpy(temperature, top_k):
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(2, 7, 50)) * 3, rng.normal(size=(2, 7, 50)) * 3
    got = float(logit_kl(jnp.asarray(teacher, jnp.float32), jnp.asarray(student, jnp.float32), temperature=temperature,
                         top_k=top_k))
    assert got == pytest.approx(numpy_kl(teacher, student, temperature, top_k), rel=1e-5)


PRUNED = ("model.hidden_size=32", "model.intermediate_size=64", "model.mamba_num_heads=2")   # the student's sizes


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, corpus):
    """A teacher (a random SMALL model: distillation needs no trained one to be checked) and a pruned copy of
    it, as model directories."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make(root / "unused", corpus)
    teacher_dir = str(root / "teacher")
    save_orbax(teacher.model, teacher_dir)
    batches = [np.asarray(b) for b in teacher.corpus.validation_batches(2)]
    scores = importance.collect(teacher.model, batches)
    pruned = prune.prune(teacher.model, scores, prune.Targets(hidden_size=32, intermediate_size=64,
                                                              mamba_num_heads=2))
    save_orbax(pruned, str(root / "pruned"))
    return teacher_dir, str(root / "pruned"), pruned


def test_distilling_a_pruned_student_reports_and_lowers_the_kl_to_the_teacher(tmp_path, corpus, dirs):
    teacher_dir, pruned_dir, pruned = dirs
    student = make(tmp_path, corpus, f"train.distill_teacher={teacher_dir}", f"train.init_from={pruned_dir}", *PRUNED,
                   "train.distill.ce_weight=0.5", "train.steps=8", "train.optim.lr=1e-3", "train.optim.warmup_steps=1")
    for a, b in zip(jax.tree.leaves(nnx.state(student.model, PERSISTENT)), jax.tree.leaves(nnx.state(pruned,
                                                                                                      PERSISTENT))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))             # started from the pruned weights
    batch = student._global_batch(next(student.corpus.train_iterator(None)))
    teacher_logits = np.asarray(student.teacher(batch[:, :-1]))
    student_logits = np.asarray(student.model(batch[:, :-1]))
    step = make_train_step(student.model_cfg, student.cfg, student.lr_schedule)
    metrics = step(student.model, student.opt, batch, student.teacher)
    kl = numpy_kl(teacher_logits, student_logits)
    assert float(metrics["kl_loss"]) == pytest.approx(kl, rel=1e-4)
    assert float(metrics["total_loss"]) == pytest.approx(kl + 0.5 * float(metrics["loss"]), rel=1e-4)
    kl_only = make_train_step(student.model_cfg, dataclasses.replace(student.cfg, distill=DistillConfig()),
                              student.lr_schedule)
    before = numpy_kl(teacher_logits, np.asarray(student.model(batch[:, :-1])))
    for _ in range(6):
        kl_only(student.model, student.opt, batch, student.teacher)
    after = numpy_kl(teacher_logits, np.asarray(student.model(batch[:, :-1])))
    assert after < 0.8 * before


def test_bad_distillation_settings_are_one_error_each(tmp_path, corpus, dirs):
    teacher_dir, pruned_dir, _ = dirs
    with pytest.raises(ConfigError, match="vocab_size 320, the student 512"):
        make(tmp_path / "a", corpus, f"train.distill_teacher={teacher_dir}", "model.vocab_size=512")
    with pytest.raises(ConfigError, match="init_from .* another architecture .*intermediate_size 64 vs the run's 128"):
        make(tmp_path / "b", corpus, f"train.init_from={pruned_dir}", "model.hidden_size=32", "model.mamba_num_heads=2")
    with pytest.raises(ConfigError, match="kl_weight and ce_weight are both 0"):
        make(tmp_path / "c", corpus, "train.distill.kl_weight=0")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        make(tmp_path / "d", corpus, "train.distill.temperature=0")
    assert not any(os.path.exists(tmp_path / d) for d in "abcd")               # nothing written
