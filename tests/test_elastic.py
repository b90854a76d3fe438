"""Nemotron Elastic (issue 15): nested submodels of one parent.

The reference for an extracted submodel is the parent itself run with that submodel's masks (the extraction
cuts weights, the masks only zero units inside the unchanged parent); for the parameter count it is the
extracted model's own count; sorting must not change the parent's function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.compress import elastic, importance
from nemojax.compress.elastic import ElasticConfig
from nemojax.config import ConfigError, ModelConfig
from nemojax.model import PERSISTENT, NemotronH, count_params

TINY = ModelConfig.from_yaml("configs/tiny.yaml")                                   # M-M*-M-
TINY_MOE = ModelConfig.from_yaml("configs/tiny_moe.yaml").replace(num_nextn_predict_layers=0)   # ME*EME
IDS = np.random.default_rng(0).integers(3, 300, (4, 33)).astype(np.int32)
EC = ElasticConfig(budgets=(1.0, 0.5), max_skip=1)


def _run(cfg, seed=0):
    parent = NemotronH(cfg, nnx.Rngs(seed))
    batches = [IDS[:2], IDS[2:]]
    scores = importance.collect(parent, batches)
    scores.stats.update(importance.depth_scores(parent, batches))
    return parent, elastic.start(parent, scores, EC)


@pytest.fixture(scope="module", params=["dense", "moe"])
def started(request):
    return _run(TINY if request.param == "dense" else TINY_MOE)


def _logits(model):
    return np.asarray(model(jnp.asarray(IDS[:, :-1])))


def test_sorting_into_importance_order_keeps_the_function(started):
    parent, run = started
    np.testing.assert_allclose(_logits(run.model), _logits(parent), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(np.asarray(run.model.embeddings.embedding[...]),
                              np.asarray(parent.embeddings.embedding[...]))       # it did permute


def test_extracted_submodel_equals_the_parent_under_its_masks(started):
    _, run = started
    full = _logits(run.model)
    chosen = {axis: sizes[len(sizes) // 2] for axis, sizes in run.sizes.items()}   # a middle size of every axis
    chosen["skip_layers"] = 1
    sub = run.extract_sizes(chosen)
    cfg = sub.config
    assert cfg.hidden_size == chosen["hidden_size"] and cfg.num_layers == run.model.config.num_layers - 1
    if "n_routed_experts" in chosen:
        assert cfg.n_routed_experts == chosen["n_routed_experts"]
    run.masked(chosen)
    try:
        want = _logits(run.model)
    finally:
        run.unmasked()
    np.testing.assert_allclose(_logits(sub), want, rtol=2e-5, atol=2e-5)
    assert np.abs(want - full).max() > 1e-2                                        # the masks did something
    np.testing.assert_allclose(_logits(run.model), full, rtol=0, atol=0)           # unmasked: the parent again
    # the budget loss counts the submodel's parameters exactly
    assert elastic.expected_params(run, chosen) == count_params(sub)


def test_the_full_budget_extracts_the_parent(started):
    _, run = started
    largest = {axis: sizes[0] for axis, sizes in run.sizes.items()}
    np.testing.assert_allclose(_logits(run.extract_sizes(largest)), _logits(run.model), rtol=1e-6, atol=1e-6)


def test_training_meets_the_budgets_and_the_run_round_trips(tmp_path):
    parent, run = _run(TINY_MOE, seed=1)
    history = elastic.train(run, [IDS[:2], IDS[2:]], steps=40)
    assert all(np.isfinite(row["loss"]) for row in history)
    total = count_params(run.model)
    half = run.chosen(0.5)
    ratio = elastic.expected_params(run, half) / total
    assert abs(ratio - 0.5) < 0.1, (half, ratio)
    assert run.chosen(1.0) == {axis: sizes[0] for axis, sizes in run.sizes.items()}
    run.save(str(tmp_path / "run"))
    loaded = elastic.ElasticRun.load(str(tmp_path / "run"))
    assert loaded.chosen(0.5) == half and loaded.skip_order == run.skip_order
    np.testing.assert_allclose(_logits(loaded.extract(0.5)), _logits(run.extract(0.5)), rtol=1e-6, atol=1e-6)
    assert np.isfinite(_logits(loaded.extract(0.5))).all()
    with pytest.raises(ValueError, match="not one of the run's budgets"):
        loaded.extract(0.3)


@pytest.mark.parametrize("budgets", [(1.0, 0.0), (1.5,), (-0.5,), (0.5, 0.5)])
def test_a_budget_outside_zero_one_is_one_clear_error(budgets):
    with pytest.raises(ConfigError, match="budget"):
        ElasticConfig(budgets=budgets)


def test_models_the_masks_cannot_cover_are_refused():
    with pytest.raises(ConfigError, match="MTP"):
        elastic.check_model(ModelConfig.from_yaml("configs/tiny_moe.yaml"))
    with pytest.raises(ConfigError, match="attn_qkv_norm"):          # its attention norm is not a masked pre-norm
        elastic.check_model(TINY.replace(attn_qkv_norm=True))


def test_gumbel_choice_is_one_hot_forward_with_the_softmax_gradient():
    logits = jnp.asarray([0.3, -1.0, 2.0])
    hard, probs = elastic.gumbel_hard(logits, None, 1.0)
    np.testing.assert_array_equal(np.asarray(hard), [0.0, 0.0, 1.0])
    v = jnp.asarray([1.0, 2.0, 3.0])
    grad = jax.grad(lambda lg: elastic.gumbel_hard(lg, None, 1.0)[0] @ v)(logits)
    soft = jax.nn.softmax(logits)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(soft * (v - soft @ v)), rtol=1e-5)   # softmax's


def test_nemojax_elastic_train_and_extract(tmp_path, capsys):
    """The CLI end to end: bad budgets are one error with nothing written; the extracted HF checkpoint loads in
    nemojax with the weights the run's own extraction gives."""
    import json
    import os

    from nemojax.cli import main
    from nemojax.convert.auto import load_model
    from nemojax.convert.orbax import save_orbax

    src, run_dir = str(tmp_path / "src"), str(tmp_path / "run")
    save_orbax(NemotronH(TINY, nnx.Rngs(8)), src)
    calib = ["--calib-tokens", "300", "--calib-seq-len", "32", "--calib-batch", "4"]
    for budgets in ("1,1.5", "0,1", "x", ""):
        assert main(["elastic", "train", src, run_dir, "--budgets", budgets, *calib]) == 2
        assert "budget" in capsys.readouterr().err
    assert not os.path.exists(run_dir)
    assert main(["elastic", "train", src, run_dir, "--budgets", "1,0.6", "--steps", "4", "--tokens", "300",
                 *calib]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["budgets"]) == {"1", "0.6"}
    assert main(["elastic", "extract", run_dir, str(tmp_path / "bad"), "--budget", "0.3"]) == 2
    assert "not one of the run's budgets" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")
    assert main(["elastic", "extract", run_dir, str(tmp_path / "small"), "--budget", "0.6", "--hf"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["params"] == report["budgets"]["0.6"]["params"]
    small = load_model(str(tmp_path / "small"))
    want = dict(nnx.state(elastic.ElasticRun.load(run_dir).extract(0.6), PERSISTENT).flat_state())
    got = nnx.state(small, PERSISTENT).flat_state()
    assert len(got) == len(want)
    for path, var in got:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[path].get_value()))


def test_nemojax_train_with_elastic_budgets_resumes_exactly_and_exports_an_elastic_run(tmp_path, corpus):
    """train.elastic.budgets through the Trainer: its data, checkpoints (router and its optimizer included) and
    export. A run interrupted after 3 steps and resumed equals one that ran straight through; the export is an
    elastic run whose extraction equals its parent under the masks; the teacher stays the (sorted) parent."""
    from train_helpers import SMALL, make

    from nemojax.convert.orbax import save_orbax
    from nemojax.train.trainer import load_run_config

    parent = NemotronH(load_run_config("configs/tiny.yaml", SMALL)[0], nnx.Rngs(3))
    save_orbax(parent, str(tmp_path / "parent"))
    opts = ("train.steps=6", "train.save_every=3", "train.eval_every=6", f"train.init_from={tmp_path / 'parent'}",
            "train.elastic.budgets=[1.0,0.5]", "train.elastic.calib_batches=2")
    straight = make(tmp_path / "a", corpus, *opts)
    history = straight.run(progress=False)
    assert {"kd@0.5", "params@0.5", "budget_loss@1", "tau"} <= history[-1].keys()
    make(tmp_path / "b", corpus, *opts).run(stop_after=3, progress=False)
    resumed = make(tmp_path / "b", corpus, *opts)
    resumed.run(progress=False)
    for a, b in ((straight.model, resumed.model), (straight.elastic.router, resumed.elastic.router)):
        for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_logits(straight.teacher), _logits(parent), rtol=1e-5, atol=1e-5)
    assert np.abs(_logits(straight.model) - _logits(parent)).max() > 1e-4          # the model did train
    run = elastic.ElasticRun.load(straight.export())
    chosen = {axis: sizes[len(sizes) // 2] for axis, sizes in run.sizes.items()}
    run.masked(chosen)
    want = _logits(run.model)
    run.unmasked()
    np.testing.assert_allclose(_logits(run.extract_sizes(chosen)), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ConfigError, match="elastic setting"):                       # other budgets: refused
        make(tmp_path / "b", corpus, *opts, "train.elastic.budgets=[1.0,0.6]", "train.steps=8").run(progress=False)
    with pytest.raises(ConfigError, match="train.init_from"):
        load_run_config("configs/tiny.yaml", ("train.elastic.budgets=[1.0,0.5]",))
    for other in ("train.precision=nvfp4", f"train.distill_teacher={tmp_path / 'parent'}"):
        with pytest.raises(ConfigError, match="its own frozen parent"):
            load_run_config("configs/tiny.yaml", (*opts, other))
    with pytest.raises(ConfigError, match="calib_batches"):
        load_run_config("configs/tiny.yaml", (*opts, "train.elastic.calib_batches=0"))
