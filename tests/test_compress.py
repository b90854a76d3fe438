"""Compression (issue 15): importance estimation and structured pruning.

Importance must find what was planted (a channel, head, KV group, Mamba head and head-dim channel, expert made
to matter far more than the rest); group-aware Mamba pruning must keep heads per group equal and compute what the
parent computes with the pruned heads and channels masked out; depth pruning must equal running the parent
without those blocks; pruned models must load in transformers with equal logits; bad targets are one error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.compress import importance, prune
from nemojax.compress.importance import Scores
from nemojax.compress.prune import Targets
from nemojax.config import ConfigError, ModelConfig
from nemojax.layers.block import run_blocks
from nemojax.layers.common import Mode
from nemojax.model import PERSISTENT, NemotronH

TINY = ModelConfig.from_yaml("configs/tiny.yaml")                     # M-M*-M-, Mamba 8 heads in 2 groups
TINY_MOE = ModelConfig.from_yaml("configs/tiny_moe.yaml")             # ME*EME + MTP '*E', 16 experts
IDS = np.random.default_rng(0).integers(3, 300, (4, 49)).astype(np.int32)


def scores_of(model) -> Scores:
    return importance.collect(model, [IDS[:2], IDS[2:]])


@pytest.fixture(scope="module")
def moe_model():
    return NemotronH(TINY_MOE, nnx.Rngs(0))


@pytest.fixture(scope="module")
def moe_scores(moe_model):
    return scores_of(moe_model)


# ------------------------------------------------------------------------------------------------ importance
def test_planted_mlp_neuron_embedding_channel_and_attention_group_rank_first():
    model = NemotronH(TINY, nnx.Rngs(1))
    mlp, attn = model.layers[1].mixer, model.layers[3].mixer                       # '-' and '*'
    mlp.up_proj.kernel[...] = mlp.up_proj.kernel[...].at[:, 77].multiply(8.0)
    v = attn.v_proj.kernel[...]
    attn.v_proj.kernel[...] = v.at[:, 32:64].multiply(8.0)                         # KV group 1 (head_dim 32)
    for block in model.layers:
        block.norm.weight[...] = block.norm.weight[...].at[101].set(6.0)
    scores = scores_of(model)
    assert prune._top(scores.get(("layers", 1), "neurons"), 1)[0] == 77
    assert prune._top(scores.embed(), 1)[0] == 101
    groups, heads = prune.attention_selection(np.sqrt(scores.get(("layers", 3), "heads")), 2, 1, 2)
    assert list(groups) == [1] and sorted(heads) == [2, 3]                         # whole group 1: heads 2, 3


def test_planted_mamba_head_and_channel_rank_first_within_their_group():
    model = NemotronH(TINY, nnx.Rngs(2))
    mixer = model.layers[2].mixer                                                   # 'M': 8 heads x 32, 2 groups
    k = mixer.in_proj_x.kernel[...].reshape(TINY.hidden_size, 8, 32)
    k = k.at[:, 6, :].multiply(5.0).at[:, :, 9].multiply(4.0)                      # head 6 (group 1), channel 9
    mixer.in_proj_x.kernel[...] = k.reshape(TINY.hidden_size, 256)
    x = np.sqrt(scores_of(model).get(("layers", 2), "x"))
    assert x.shape == (8, 32)
    heads, channels = prune.mamba_selection(x, groups=2, heads=4, head_dim=8)
    assert channels[0] == 9
    assert heads[2] == 6                                 # first of group 1's picks (heads 4..7), by importance
    assert all(h < 4 for h in heads[:2]) and all(h >= 4 for h in heads[2:])       # two heads in each group


def test_planted_expert_ranks_first(moe_model):
    model = NemotronH(TINY_MOE, nnx.Rngs(0))
    moe = model.layers[3].mixer
    moe.e_score_correction_bias[...] = moe.e_score_correction_bias[...].at[11].set(10.0)   # always routed
    moe.down_proj[...] = moe.down_proj[...].at[11].multiply(6.0)
    scores = scores_of(model)
    assert prune._top(scores.get(("layers", 3), "expert_output"), 1)[0] == 11
    assert scores.get(("layers", 3), "expert_load")[11] == IDS.shape[0] * (IDS.shape[1] - 1)   # every token


def test_scores_file_round_trip_and_refuses_another_model(tmp_path, moe_model, moe_scores):
    path = str(tmp_path / "scores.safetensors")
    moe_scores.save(path)
    again = Scores.load(path, TINY_MOE)
    assert again.tokens == moe_scores.tokens and again.stats.keys() == moe_scores.stats.keys()
    for key, value in moe_scores.stats.items():
        np.testing.assert_array_equal(again.stats[key], value)
    with pytest.raises(ValueError, match="scores of another model .*hidden_size"):
        Scores.load(path, TINY_MOE.replace(hidden_size=64))


# ------------------------------------------------------------------------------------------------ pruning
def test_group_aware_mamba_pruning_equals_the_masked_parent():
    """Pruned heads and head-dim channels: the pruned layer computes what the parent computes with those
    channels' SSM outputs zeroed and left out of the gated norm's group statistics (fp32)."""
    model = NemotronH(TINY, nnx.Rngs(3))
    scores = scores_of(model)
    pruned = prune.prune(model, scores, Targets(mamba_num_heads=4, mamba_head_dim=24))
    assert pruned.config.mamba_num_heads == 4 and pruned.config.mamba_head_dim == 24
    x = jax.random.normal(jax.random.key(0), (2, 37, TINY.hidden_size))
    for i in (0, 2, 5):
        heads, channels = prune.mamba_selection(np.sqrt(scores.get(("layers", i), "x")), 2, 4, 24)
        assert np.bincount(heads // 4, minlength=2).tolist() == [2, 2]             # heads per group equal
        mask = np.zeros((8, 32), np.float32)
        mask[np.ix_(heads, channels)] = 1.0
        parent = model.layers[i].mixer
        parent.channel_mask = nnx.Variable(jnp.asarray(mask))
        try:
            want = parent(x)[0]
        finally:
            parent.channel_mask = None
        got = pruned.layers[i].mixer(x)[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
        assert float(jnp.abs(parent(x)[0] - want).max()) > 1e-3          # the mask did change the layer


def test_width_pruning_of_every_axis_gives_a_valid_smaller_moe_model(moe_model, moe_scores):
    t = Targets(hidden_size=96, mamba_num_heads=4, mamba_head_dim=16, num_attention_heads=2,
                num_key_value_heads=1, n_routed_experts=8, moe_intermediate_size=48)
    pruned = prune.prune(moe_model, moe_scores, t)
    cfg = pruned.config
    assert (cfg.hidden_size, cfg.mamba_num_heads, cfg.num_attention_heads, cfg.n_routed_experts) == (96, 4, 2, 8)
    assert pruned.layers[1].mixer.up_proj[...].shape == (8, 96, 48)
    logits, mtp = pruned.forward_with_mtp(jnp.asarray(IDS[:, :-1]))
    assert logits.shape == (4, 48, 320) and bool(jnp.isfinite(logits).all()) and len(mtp) == 1
    # the kept experts' rows of the router, its correction bias and the experts themselves move together
    experts = prune._top(moe_scores.get(("layers", 1), "expert_output"), 8)
    np.testing.assert_array_equal(pruned.layers[1].mixer.e_score_correction_bias[...],
                                  moe_model.layers[1].mixer.e_score_correction_bias[...][experts])


def test_expert_pruning_alone_equals_the_parent_when_the_dropped_experts_are_never_chosen():
    """An expert the router never picks contributes nothing, so removing it changes no logit (an independent
    check of the router / bias / expert slicing: the parent is the reference)."""
    model = NemotronH(TINY_MOE.replace(num_nextn_predict_layers=0), nnx.Rngs(4))
    for i in (1, 3, 5):
        moe = model.layers[i].mixer
        moe.e_score_correction_bias[...] = moe.e_score_correction_bias[...].at[8:].set(-100.0)   # 8..15 unused
    scores = scores_of(model)
    pruned = prune.prune(model, scores, Targets(n_routed_experts=8))
    for i in (1, 3, 5):
        assert sorted(prune._top(scores.get(("layers", i), "expert_output"), 8)) == list(range(8))
    np.testing.assert_allclose(np.asarray(pruned(jnp.asarray(IDS))), np.asarray(model(jnp.asarray(IDS))),
                               rtol=1e-5, atol=1e-5)


def test_depth_pruning_rewrites_the_pattern_and_equals_skipping_the_blocks():
    model = NemotronH(TINY, nnx.Rngs(5))
    pruned = prune.drop_layers(model, (1, 4))
    assert pruned.config.pattern == "MM*M-" and len(pruned.layers) == 5
    ids = jnp.asarray(IDS)
    h = model.embeddings(ids)
    h, _ = run_blocks([b for i, b in enumerate(model.layers) if i not in (1, 4)], h, mask=None, caches=None,
                      mode=Mode.TRAIN)
    want = model.logits(model.norm_f(h))
    np.testing.assert_allclose(np.asarray(pruned(ids)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_depth_scores_rank_a_layer_that_does_nothing_least_important():
    model = NemotronH(TINY, nnx.Rngs(6))
    model.layers[3].mixer.o_proj.kernel[...] = jnp.zeros_like(model.layers[3].mixer.o_proj.kernel[...])
    scores = scores_of(model)
    scores.stats.update(importance.depth_scores(model, [IDS]))
    assert abs(scores.stats["depth/loss"][3]) < 1e-6 and scores.stats["depth/nmse"][3] < 1e-10
    for metric in ("nmse", "bi"):          # (a random model's loss can fall when a layer goes: no ranking test)
        assert prune.rank_layers(scores, 7, metric)[0] == 3, metric
    order = prune.rank_layers(scores, 7, "loss")
    assert list(scores.stats["depth/loss"][order]) == sorted(scores.stats["depth/loss"])


@pytest.mark.parametrize("targets, message", [
    (Targets(hidden_size=256), "hidden_size=256 is larger than the model's 128"),
    (Targets(mamba_num_heads=3), "not divisible by n_groups=2"),
    (Targets(num_attention_heads=3), "multiple of 2"),
    (Targets(n_routed_experts=4), "'E' layers"),
    (Targets(drop_layers=(7,)), r"distinct layer indices in \[0, 7\)"),
    (Targets(drop_layers=tuple(range(7))), "leaves none"),
])
def test_bad_targets_are_one_clear_error(targets, message):
    with pytest.raises(ConfigError, match=message):
        prune.pruned_config(TINY, targets)


def test_pruned_model_loads_in_transformers_with_equal_logits(tmp_path):
    pytest.importorskip("transformers")
    from hf_helpers import TINY_MOE as HF_MOE
    from hf_helpers import build_hf_model, hf_logits, save_hf_model
    from transformers import NemotronHForCausalLM

    from nemojax import load_hf, save_hf

    source = save_hf_model(build_hf_model(seed=7, **HF_MOE), tmp_path / "parent")
    model = load_hf(source)
    ids = IDS[:, :20] % model.config.vocab_size
    scores = importance.collect(model, [ids])
    t = Targets(hidden_size=40, mamba_num_heads=4, mamba_head_dim=4, num_attention_heads=3, num_key_value_heads=1,
                intermediate_size=48, n_routed_experts=4, moe_intermediate_size=16, drop_layers=(4,))
    pruned = prune.prune(model, scores, t)
    save_hf(pruned, tmp_path / "pruned")
    theirs = NemotronHForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    assert theirs.config.hidden_size == 40 and theirs.config.num_hidden_layers == 5
    ours = np.asarray(pruned(jnp.asarray(ids)))
    ref = hf_logits(theirs, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------ CLI
def test_nemojax_prune_writes_a_pruned_model_reuses_its_scores_and_refuses_bad_targets(tmp_path, capsys):
    import json
    import os

    from nemojax.cli import main
    from nemojax.convert.auto import load_model
    from nemojax.convert.orbax import save_orbax

    src = str(tmp_path / "src")
    save_orbax(NemotronH(TINY, nnx.Rngs(8)), src)
    calib = ["--calib-tokens", "600", "--calib-seq-len", "64", "--calib-batch", "4"]
    bad = [(["--mamba-num-heads", "3"], "not divisible by n_groups=2"),
           (["--hidden-size", "512"], "larger than the model's 128"),
           (["--drop-layers", "7"], "drop 1 to 6"), (["--drop-layers", "x,"], "expected a count")]
    for args, message in bad:
        assert main(["prune", src, str(tmp_path / "bad"), *args, *calib]) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    scores = str(tmp_path / "scores.safetensors")
    assert main(["prune", src, str(tmp_path / "a"), "--mamba-num-heads", "4", "--intermediate-size", "192",
                 "--drop-layers", "1", "--scores", scores, *calib]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out.strip().splitlines()[-1])
    assert "importance from 512 calibration tokens" in printed.err      # 600 asked: 8 full windows of 64
    pruned = load_model(str(tmp_path / "a"))
    assert pruned.config.num_layers == 6 and pruned.config.mamba_num_heads == 4
    assert report["params_after"] < report["params_before"] and len(report["dropped_layers"]) == 1
    # again from the saved scores (no calibration), as an HF checkpoint: the same weights
    assert main(["prune", src, str(tmp_path / "b"), "--mamba-num-heads", "4", "--intermediate-size", "192",
                 "--drop-layers", f"{report['dropped_layers'][0]},", "--scores", scores, "--hf"]) == 0
    assert "importance scores from" in capsys.readouterr().err
    again = load_model(str(tmp_path / "b"))
    theirs = dict(nnx.state(again, PERSISTENT).flat_state())
    for path, var in nnx.state(pruned, PERSISTENT).flat_state():
        np.testing.assert_array_equal(np.asarray(theirs[path].get_value()), np.asarray(var.get_value()))


def test_search_candidates_lie_within_the_budget_closest_first(moe_scores):
    from nemojax.compress.search import candidates
    from nemojax.convert.hf import active_param_count, param_count

    for active in (False, True):
        count = active_param_count if active else param_count
        found = candidates(TINY_MOE, moe_scores, 0.6, active=active, band=0.1)
        assert found, active
        fractions = [count(c.config) / count(TINY_MOE) for c in found]
        assert all(0.5 <= f <= 0.6 for f in fractions) and fractions == sorted(fractions, reverse=True)
        assert all(c.config.mamba_num_heads % 2 == 0 and c.config.n_routed_experts >= 4 for c in found)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        candidates(TINY_MOE, moe_scores, 1.5)


def test_nemojax_prune_search_ranks_distilled_candidates_and_writes_the_best(tmp_path, capsys):
    from nemojax.cli import main
    from nemojax.convert.auto import load_model
    from nemojax.convert.hf import param_count
    from nemojax.convert.orbax import save_orbax

    src = str(tmp_path / "src")
    save_orbax(NemotronH(TINY, nnx.Rngs(9)), src)
    args = ["prune", src, str(tmp_path / "best"), "--search", "--param-budget", "0.7", "--search-candidates", "2",
            "--search-steps", "2", "--calib-tokens", "600", "--calib-seq-len", "32", "--calib-batch", "2",
            "--depth-metric", "bi"]
    assert main(args) == 0
    table = open(tmp_path / "best" / "search.md").read()
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    losses = [float(r.split("|")[2]) for r in rows]
    assert losses == sorted(losses)
    best = load_model(str(tmp_path / "best"))
    assert 0.6 <= param_count(best.config) / param_count(TINY) <= 0.7
    assert main(["prune", src, str(tmp_path / "x"), "--search"]) == 2
    assert "needs one budget" in capsys.readouterr().err
