"""Training loop: loss falls, kill-and-resume reproduces an uninterrupted run, NaN stops before saving,
config errors, the decay mask and schedules."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from train_helpers import make

from nemojax.config import ConfigError
from nemojax.train.optim import OptimConfig, decay_mask, schedule
from nemojax.train.trainer import TrainingError, load_run_config


def params_of(trainer):
    from flax import nnx
    return jax.tree.leaves(nnx.state(trainer.model, nnx.Param))


def test_kill_and_resume_equals_straight_run(tmp_path, corpus):
    straight = make(tmp_path / "a", corpus)
    hist_a = straight.run(progress=False)
    first = make(tmp_path / "b", corpus)
    first.run(stop_after=10, progress=False)                     # "killed" after the step-10 checkpoint
    resumed = make(tmp_path / "b", corpus)                       # a fresh process would build this
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
    scalars = tensorboard_scalars(tmp_path / "a" / "tensorboard")
    assert scalars["train/loss"] == {m["step"]: pytest.approx(m["loss"]) for m in metrics if "loss" in m}
    assert scalars["eval/loss"][0] == pytest.approx(metrics[0]["val_loss"])


def tensorboard_scalars(directory) -> dict:
    """Reads TensorBoard event files (TFRecord framing: u64 length, u32 crc, payload, u32 crc) -> {tag: {step: v}}."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for name in os.listdir(directory):
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_nan_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, corpus):
    trainer = make(tmp_path, corpus)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7.*Last good checkpoint: step 5"):
        trainer.run(progress=False, loss_hook=lambda step, loss: float("nan") if step == 7 else loss)
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert ckpts == ["5"]
    resumed = make(tmp_path, corpus)
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


def test_train_step_donates_the_model_and_optimizer_state(tmp_path, corpus):
    from nemojax.train.trainer import make_train_step

    t = make(tmp_path, corpus)
    step = make_train_step(t.model_cfg, t.cfg, t.lr_schedule)
    kernel, moment = t.model.lm_head.kernel[...], jax.tree.leaves(t.opt.opt_state)[1]
    step(t.model, t.opt, t._global_batch(next(t.corpus.train_iterator(None))))
    assert kernel.is_deleted() and moment.is_deleted()                   # their buffers now hold the new state
    assert not t.model.lm_head.kernel[...].is_deleted()



def test_resuming_checkpoints_of_another_run_is_refused_before_anything_changes(tmp_path, corpus, capsys):
    """CKPT_DIR/run.json records the architecture, precision recipe and QAD teacher; a run that differs in any of
    them, or whose train.steps is below the checkpoint's step, is one error naming the difference, and the
    checkpoints stay as they were. More steps continue the run with a note on the stretched schedule."""
    run_dir = tmp_path / "run"
    first = make(run_dir, corpus, "train.steps=5")
    first.run(progress=False)
    first.export()
    before = sorted(os.listdir(run_dir / "checkpoints"))
    refusals = {("train.steps=5", "train.precision=fp8"): r"another precision recipe \(precision 'bf16' -> 'fp8'\)",
                ("train.steps=5", "train.quant.bf16_last=3"): r"another precision recipe \(quant.bf16_last None -> 3\)",
                ("train.steps=5", "model.intermediate_size=96"):
                    r"another architecture \(intermediate_size 128 -> 96\)",
                ("train.steps=3",): r"at step 5, past train.steps=3; raise train.steps"}
    for extra, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            make(run_dir, corpus, *extra).run(progress=False)
    assert sorted(os.listdir(run_dir / "checkpoints")) == before
    with pytest.raises(ConfigError, match="lies inside this run's train.ckpt_dir"):
        make(run_dir, corpus, "train.precision=nvfp4", f"train.qad_teacher={run_dir / 'model'}")
    for name in ("teacher_a", "teacher_b"):
        shutil.copytree(run_dir / "model", tmp_path / name)
    qad = ("train.steps=2", "train.precision=nvfp4")
    make(tmp_path / "qad", corpus, *qad, f"train.qad_teacher={tmp_path / 'teacher_a'}").run(progress=False)
    with pytest.raises(ConfigError, match=r"another QAD teacher \(qad_teacher '.*teacher_a' -> '.*teacher_b'\)"):
        make(tmp_path / "qad", corpus, *qad, f"train.qad_teacher={tmp_path / 'teacher_b'}").run(progress=False)
    capsys.readouterr()
    history = make(run_dir, corpus, "train.steps=10").run(progress=False)
    assert [h["step"] for h in history if "loss" in h] == list(range(6, 11))
    err = capsys.readouterr().err
    assert f"resumed from step 5 in {run_dir}" in err
    # TensorBoard is told to drop earlier events from step 6 on (they are logged again by the resumed run)
    assert 6 in tensorboard_purge_steps(run_dir / "tensorboard")
    # WSD over 5 steps had decayed to its floor at step 5; laid out over 10 it is back at the peak rate
    lr = OptimConfig().lr
    assert re.search(rf"train.steps 5 -> 10: the wsd learning-rate schedule .* at step 5 the rate is "
                     rf"{lr:.3g} \(it was [0-9.e-]+ under 5 steps\)", err), err


def test_progress_rate_and_eta_start_after_the_compiling_first_step():
    import io

    from tqdm import tqdm

    from nemojax.train.trainer import _restart_rate

    bar = tqdm(total=400, initial=200, file=io.StringIO(), desc="train (compiling the step)")
    bar.start_t -= 100.0                     # the resumed run's first step took 100 s (compiling)
    _restart_rate(bar, 201)
    d = bar.format_dict
    assert (d["n"], d["initial"], d["prefix"].rstrip(": ")) == (201, 201, "train") and d["elapsed"] < 5
    bar.start_t -= 1.0                       # the next step takes 1 s
    bar.last_print_t -= 1.0
    bar.update(1)
    assert 0.5 < bar.format_dict["rate"] < 2.0, bar.format_dict      # 1 step/s, not 2 steps per 101 s
    bar.close()


def tensorboard_purge_steps(directory) -> list[int]:
    """Steps of the SessionLog START events (TensorBoard's purge markers) in a directory's event files (TFRecord
    framing: length, its crc, the Event proto, its crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps.append(event.step)
    return steps
