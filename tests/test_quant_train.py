"""Low precision end to end: every precision trains through `Trainer`, QAD from a trained teacher, and the
4-bit packed export (greedy tokens vs its fake-quantized counterpart, bytes, Orbax round trip, CLI)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import make as make_small

from nemojax.config import ConfigError
from nemojax.convert.auto import load_model
from nemojax.convert.orbax import save_packed
from nemojax.generate import generate
from nemojax.quant import apply_precision
from nemojax.quant.pack import PackSpec, fake_quantize_weights, pack_model, weight_bytes
from nemojax.quant.recipe import QuantDot
from nemojax.train.trainer import eval_loss


def make(directory, corpus, *extra):
    return make_small(directory, corpus, "train.save_every=100", "train.optim.warmup_steps=3", *extra)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, corpus):
    """A briefly trained high-precision model, exported as a nemojax Orbax model directory."""
    d = tmp_path_factory.mktemp("teacher")
    t = make(d, corpus, "train.steps=30", "train.eval_every=30")
    t.run(progress=False)
    return t.export()


# The Trainer path is one for every precision; the AQT precisions train through it in tests/test_sharding.py
# (aqt_int8, on a mesh), tests/test_scan.py (aqt_int4) and the quantized_training notebook, and every
# precision's matmuls are checked in tests/test_quant.py.
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_every_precision_trains(tmp_path, corpus, precision):
    """8 steps lower the validation loss; the forward switches back to high precision at step 7
    (train.quant.bf16_forward_from_step), also when the run resumes after step 6."""
    t = make(tmp_path, corpus, f"train.precision={precision}", "train.steps=8", "train.eval_every=4",
             "train.quant.bf16_forward_from_step=7")
    first = t.run(stop_after=6, progress=False)
    quant = _quant_dots(t.model)
    assert quant and all(q.quantize_fprop for _, q in quant)
    hist = first + t.run(progress=False)
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.5 and math.isfinite(hist[-1]["val_loss"])
    assert {q.kind for _, q in quant} == {precision}
    assert all(not q.quantize_fprop for _, q in _quant_dots(t.model))    # steps 7 and 8: switched


def _quant_dots(model):
    return [(lin, lin.dot_general) for _, lin in nnx.iter_graph(model)
            if isinstance(lin, nnx.Linear) and isinstance(lin.dot_general, QuantDot)]


def test_precision_config_errors(tmp_path, corpus):
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        make(tmp_path, corpus, "train.precision=fp4")
    with pytest.raises(ConfigError, match="unknown key 'rht'"):
        make(tmp_path, corpus, "train.quant.rht=false")
    with pytest.raises(ConfigError, match="nvfp4 student"):
        make(tmp_path, corpus, f"train.qad_teacher={tmp_path}")


QAD = ("train.precision=nvfp4", "train.optim.weight_decay=0", "train.quant.bf16_last=0",
       "train.quant.quantize_attention=true")


def test_qad_starts_from_ptq(tmp_path, corpus, teacher_dir):
    qad = make(tmp_path, corpus, *QAD, f"train.qad_teacher={teacher_dir}", "train.steps=2", "train.eval_every=2")
    hist = qad.run(progress=False)
    # step 0 = post-training quantization of the teacher: recompute it independently
    ptq = load_model(teacher_dir)
    apply_precision(ptq, "nvfp4", qad.cfg.quant, straight_through=True)
    batches = [qad._global_batch(b) for b in qad.corpus.validation_batches(qad.cfg.eval_batches)]
    ptq_loss = float(np.mean([float(eval_loss(ptq, b)) for b in batches]))
    assert hist[0]["val_loss"] == pytest.approx(ptq_loss, rel=1e-6)
    gap = jnp.abs(ptq(batches[0]) - qad.teacher(batches[0])).max() / jnp.abs(qad.teacher(batches[0])).max()
    assert float(gap) > 1e-2                                     # the student really is quantized
    assert hist[1]["kl_loss"] > 0 and "total_loss" not in hist[1]


def test_qad_step_lowers_the_kl_to_the_teacher(tmp_path, corpus, teacher_dir):
    from nemojax.quant.qad import logit_kl
    from nemojax.train.trainer import make_train_step

    qad = make(tmp_path, corpus, *QAD, f"train.qad_teacher={teacher_dir}", "train.steps=15", "train.optim.lr=1e-4")
    qad.apply_precision(0)
    batch = qad._global_batch(next(qad.corpus.train_iterator(None)))
    step = make_train_step(qad.model_cfg, qad.cfg, qad.lr_schedule)
    before = float(logit_kl(qad.teacher(batch), qad.model(batch)))
    for _ in range(15):
        metrics = step(qad.model, qad.opt, batch, qad.teacher)
    after = float(logit_kl(qad.teacher(batch), qad.model(batch)))
    assert after < 0.7 * before
    assert after < float(metrics["kl_loss"]) < before      # it reports the KL before its own (last) update
    teacher_params = jax.tree.leaves(nnx.state(load_model(teacher_dir), nnx.Param))
    for a, b in zip(jax.tree.leaves(nnx.state(qad.teacher, nnx.Param)), teacher_params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))    # the teacher stays frozen


def test_qad_teacher_must_match_the_architecture(tmp_path, corpus, teacher_dir):
    with pytest.raises(ConfigError, match="hidden_size"):
        make(tmp_path, corpus, "train.precision=nvfp4", f"train.qad_teacher={teacher_dir}", "model.hidden_size=32")


@pytest.mark.parametrize("fmt", ["nvfp4", "int4"])
def test_packed_model_generates_like_its_fake_quantized_counterpart(tmp_path, teacher_dir, fmt):
    spec = PackSpec(fmt)
    reference = load_model(teacher_dir)
    fake = fake_quantize_weights(load_model(teacher_dir), spec)
    packed = load_model(teacher_dir)
    report = pack_model(packed, spec)
    assert report["skipped"] == [] and report["packed"] == 1 + sum(
        isinstance(n, nnx.Linear) for _, n in nnx.iter_graph(reference))
    # bytes: a bf16 model vs the same model packed (what is left unpacked, norms and SSM parameters, stays bf16)
    bf16 = load_model(teacher_dir, dtype="bfloat16")
    bf16_bytes = weight_bytes(bf16)
    pack_model(bf16, spec)
    assert weight_bytes(bf16) <= 0.3 * bf16_bytes
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)), jnp.int32)
    want = np.asarray(generate(fake, prompts, max_new_tokens=16))
    got = np.asarray(generate(packed, prompts, max_new_tokens=16))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, np.asarray(generate(reference, prompts, max_new_tokens=16))) or fmt == "int4"
    np.testing.assert_allclose(np.asarray(packed(prompts)), np.asarray(fake(prompts)), rtol=1e-4, atol=1e-4)
    # Orbax round trip of the packed form, found by the generic loader
    save_packed(packed, tmp_path / "packed", spec)
    restored = load_model(str(tmp_path / "packed"))
    np.testing.assert_array_equal(np.asarray(generate(restored, prompts, max_new_tokens=16)), want)
    assert json.load(open(tmp_path / "packed" / "nemojax_pack.json"))["fmt"] == fmt


def test_packed_tied_embeddings_serve_as_the_output_layer():
    from nemojax.config import ModelConfig
    from nemojax.model import NemotronH
    from nemojax.quant.pack import PackedEmbed

    cfg = ModelConfig.from_yaml("configs/tiny.yaml").replace(hidden_size=64, intermediate_size=128, mamba_num_heads=4,
                                                             mamba_head_dim=16, ssm_state_size=16, head_dim=16,
                                                             tie_word_embeddings=True)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 300, (2, 10)), jnp.int32)
    for fmt in ("nvfp4", "int4"):
        fake = fake_quantize_weights(NemotronH(cfg, nnx.Rngs(0)), PackSpec(fmt))
        packed = NemotronH(cfg, nnx.Rngs(0))
        pack_model(packed, PackSpec(fmt))
        assert isinstance(packed.embeddings, PackedEmbed) and packed.lm_head is None
        np.testing.assert_allclose(np.asarray(packed(ids)), np.asarray(fake(ids)), rtol=1e-4, atol=1e-4)


def test_pack_cli(tmp_path, teacher_dir, capsys):
    from nemojax.cli import main

    assert main(["pack", teacher_dir, str(tmp_path / "p4"), "--format", "int4", "--group", "64"]) == 0
    assert "packed" in capsys.readouterr().out
    model = load_model(str(tmp_path / "p4"))
    assert model.layers[1].mixer.down_proj.block == 64          # K = 128: two groups of 64
    assert model.layers[0].mixer.in_proj_x.block == 32          # K = 64: 64 would pad K to 128
    assert main(["pack", teacher_dir, str(tmp_path / "p4")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="packed 4-bit"):
        load_model(str(tmp_path / "p4"), dtype="bfloat16")
