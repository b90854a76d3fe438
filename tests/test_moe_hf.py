"""MoE / LatentMoE logits parity with transformers, and HF-layout round trips (per-expert, stacked, MTP)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("transformers")

from hf_helpers import TINY_MOE, build_hf_model, hf_logits, random_ids, save_hf_model  # noqa: E402

from nemojax import load_hf, save_hf  # noqa: E402
from nemojax.model import NemotronH  # noqa: E402

CONFIGS = {
    "plain_top2": (dict(TINY_MOE), 3, 19),
    "latent": (dict(TINY_MOE, moe_latent_size=16, hybrid_override_pattern="EM*E"), 2, 23),
    "grouped_top4_scaled": (dict(TINY_MOE, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, hybrid_override_pattern="E*ME-E"), 3, 17),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    overrides, batch, seq = CONFIGS[request.param]
    model = build_hf_model(seed=7 + len(request.param), **overrides)
    directory = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    ids = random_ids(model.config.vocab_size, batch, seq, seed=2)
    return model, directory, ids, hf_logits(model, ids)


@pytest.mark.parametrize("impl", ["capacity", "ragged", "dense"])
def test_moe_fp32_logits_match_transformers(case, impl):
    hf, directory, ids, ref = case
    first_moe = next(layer.mixer for layer in hf.model.layers if hasattr(layer.mixer, "gate"))
    assert float(np.abs(first_moe.gate.e_score_correction_bias.numpy()).max()) > 0   # the bias really steers
    ours = np.asarray(load_hf(directory, moe_impl=impl)(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()


def test_moe_round_trip_per_expert_and_stacked(case, tmp_path):
    from transformers import NemotronHForCausalLM

    _, directory, ids, ref = case
    model = load_hf(directory)
    for layout in ("per_expert", "stacked"):
        out = tmp_path / layout
        save_hf(model, out, expert_layout=layout)
        names = open(out / "model.safetensors", "rb").read(200_000)
        assert (b"experts.0.up_proj.weight" in names) == (layout == "per_expert")
        np.testing.assert_array_equal(hf_logits(NemotronHForCausalLM.from_pretrained(str(out)).eval(), ids), ref)
        np.testing.assert_array_equal(np.asarray(load_hf(str(out))(jnp.asarray(ids))),
                                      np.asarray(model(jnp.asarray(ids))))


def test_mtp_tensors_round_trip(tmp_path):
    """Our MTP head is saved as `mtp.layers.*` (transformers ignores them) and restored exactly."""
    from transformers import NemotronHForCausalLM

    hf = build_hf_model(seed=40, **TINY_MOE)
    base = load_hf(save_hf_model(hf, tmp_path / "hf"))
    cfg = base.config.replace(num_nextn_predict_layers=1, mtp_pattern="*E")
    with_mtp = NemotronH(cfg, nnx.Rngs(3))
    nnx.update(with_mtp, nnx.state(base))           # main weights from the HF model, MTP head random
    save_hf(with_mtp, tmp_path / "mtp")
    names = open(tmp_path / "mtp" / "model.safetensors", "rb").read(200_000)
    for key in (b"mtp.layers.0.eh_proj.weight", b"mtp.layers.0.enorm.weight", b"mtp.layers.0.mixer.q_proj.weight",
                b"mtp.layers.1.mixer.experts.3.down_proj.weight", b"mtp.layers.1.final_layernorm.weight"):
        assert key in names, key
    ids = jnp.asarray(random_ids(cfg.vocab_size, 2, 15))
    reloaded = load_hf(str(tmp_path / "mtp"))
    assert reloaded.config.num_nextn_predict_layers == 1
    main_a, mtp_a = with_mtp.forward_with_mtp(ids)
    main_b, mtp_b = reloaded.forward_with_mtp(ids)
    np.testing.assert_array_equal(main_a, main_b)
    np.testing.assert_array_equal(mtp_a[0], mtp_b[0])
    hf_back = NemotronHForCausalLM.from_pretrained(str(tmp_path / "mtp")).eval()
    ref = hf_logits(hf_back, np.asarray(ids))
    assert np.abs(np.asarray(main_b) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_hf_saved_mtp_config_without_tensors_loads_without_head(tmp_path):
    """transformers re-saves drop mtp.* but keep num_nextn_predict_layers; we then load without the head."""
    hf = build_hf_model(seed=41, num_nextn_predict_layers=1, **TINY_MOE)
    model = load_hf(save_hf_model(hf, tmp_path))
    assert model.config.num_nextn_predict_layers == 0 and model.mtp is None
