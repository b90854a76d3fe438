"""Training loop: loss falls, kill-and-resume reproduces an uninterrupted run, NaN stops before saving,
config errors, the decay mask and schedules."""

import json
import os

import jax
import numpy as np
import pytest

from nemojax.config import ConfigError
from nemojax.train.data import DataConfig, split_tokens
from nemojax.train.optim import OptimConfig, decay_mask, schedule
from nemojax.train.trainer import Trainer, TrainingError, load_run_config

SMALL = ("model.hidden_size=64", "model.intermediate_size=128", "model.mamba_num_heads=4", "model.mamba_head_dim=16",
         "model.ssm_state_size=16", "model.head_dim=16", "train.data.seq_len=64", "train.data.batch_size=4",
         "train.data.max_bytes=300000", "train.eval_every=10", "train.eval_batches=2", "train.save_every=5",
         "train.log_every=5", "train.optim.warmup_steps=5", "train.steps=20")


@pytest.fixture(scope="module")
def tokens():
    cfg = DataConfig(max_bytes=300000)
    return split_tokens(cfg, "train"), split_tokens(cfg, "validation")


def make(tmp_path, tokens, *extra):
    model_cfg, train_cfg = load_run_config("configs/tiny.yaml", SMALL + (f"train.ckpt_dir={tmp_path}",) + extra)
    return Trainer(model_cfg, train_cfg, *tokens)


def params_of(trainer):
    from flax import nnx
    return jax.tree.leaves(nnx.state(trainer.model, nnx.Param))


def test_corpus_split_is_by_file_and_disjoint(tokens):
    train, val = tokens
    assert len(train) > 5 * len(val) > 0
    assert train.max() < 259 and val.max() < 259


def test_kill_and_resume_equals_straight_run(tmp_path, tokens):
    straight = make(tmp_path / "a", tokens)
    hist_a = straight.run(progress=False)
    first = make(tmp_path / "b", tokens)
    first.run(stop_after=10, progress=False)                     # "killed" after the step-10 checkpoint
    resumed = make(tmp_path / "b", tokens)                       # a fresh process would build this
    hist_b = first.history + resumed.run(progress=False)
    loss_a = [h["loss"] for h in hist_a if "loss" in h]
    loss_b = [h["loss"] for h in hist_b if "loss" in h]
    assert len(loss_a) == len(loss_b) == 20
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(params_of(straight), params_of(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert loss_a[-1] < loss_a[0] - 0.5                          # and it learns
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert metrics[0]["step"] == 0 and "val_loss" in metrics[0] and metrics[-1]["step"] == 20


def test_nan_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, tokens):
    trainer = make(tmp_path, tokens)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7.*Last good checkpoint: step 5"):
        trainer.run(progress=False, loss_hook=lambda step, loss: float("nan") if step == 7 else loss)
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert ckpts == ["5"]
    resumed = make(tmp_path, tokens)
    history = resumed.run(stop_after=1, progress=False)          # the good checkpoint restores and continues
    assert history[-1]["step"] == 6


def test_run_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'stepz'.*'steps'"):
        load_run_config("configs/tiny.yaml", ("train.stepz=3",))
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        load_run_config("configs/tiny.yaml", ("train.optim.lrr=3",))
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config("configs/tiny.yaml", ("steps",))
    model_cfg, train_cfg = load_run_config("configs/tiny.yaml", ("steps=7", "model.hidden_size=64"))
    assert train_cfg.steps == 7 and model_cfg.hidden_size == 64


def test_decay_mask_and_schedules():
    from flax import nnx

    from nemojax.config import ModelConfig
    from nemojax.model import NemotronH
    model = NemotronH(ModelConfig.from_yaml("configs/tiny.yaml"), nnx.Rngs(0))
    mask = decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    mixer = mask["layers"][0]["mixer"]
    assert mixer["in_proj_x"]["kernel"] and not mixer["A_log"] and not mixer["D"] and not mixer["dt_bias"]
    assert not mask["layers"][0]["norm"]["weight"] and not mixer["conv_x"]["bias"]
    wsd = schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2), 110)
    assert float(wsd(0)) == 0.0 and float(wsd(10)) == 1.0 and float(wsd(80)) == 1.0
    assert abs(float(wsd(110)) - 0.1) < 1e-6
    cos = schedule(OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert 0.1 < float(cos(60)) < 1.0
