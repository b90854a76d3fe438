"""Logits parity of load_hf against transformers' NemotronHForCausalLM on the same random weights (fp32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_helpers import build_hf_model, hf_logits, random_ids, save_hf_model  # noqa: E402

from nemojax import load_hf, save_hf  # noqa: E402

# Four configs varying width, head counts (GQA, MHA, MQA), n_groups in {1, 2, 4}, state size, chunk size,
# biases, and sequence lengths that are not multiples of the chunk size (some spanning several chunks).
CONFIGS = {
    "gqa_g1": (dict(n_groups=1), 3, 21),
    "mha_g2_n16": (dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, n_groups=2, ssm_state_size=16,
                        chunk_size=16, mamba_num_heads=4, mamba_head_dim=16, hybrid_override_pattern="MM*-"), 2, 37),
    "mqa_g4_noconvbias": (dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1, head_dim=10, n_groups=4,
                               ssm_state_size=4, chunk_size=4, mamba_num_heads=8, mamba_head_dim=5,
                               use_conv_bias=False, hybrid_override_pattern="-M*M"), 2, 13),
    "wide_g4_biases": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16, n_groups=4,
                            ssm_state_size=32, chunk_size=32, mamba_num_heads=12, mamba_head_dim=8,
                            intermediate_size=160, use_bias=True, mlp_bias=True,
                            hybrid_override_pattern="M-M*M-M*-"), 2, 70),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    overrides, batch, seq = CONFIGS[request.param]
    model = build_hf_model(seed=len(request.param), **overrides)
    directory = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    ids = random_ids(model.config.vocab_size, batch, seq, seed=1)
    return model, directory, ids, hf_logits(model, ids)


def test_fp32_logits_match_transformers(case):
    _, directory, ids, ref = case
    ours = np.asarray(load_hf(directory, dtype="float32")(jnp.asarray(ids)))
    scale = np.abs(ref).max()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4 * scale, np.abs(ours - ref).max() / scale
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_bf16_logits_within_bf16_tolerance(case):
    _, directory, ids, ref = case
    model = load_hf(directory, dtype="bfloat16")
    assert model.lm_head.kernel[...].dtype == jnp.bfloat16
    ours = np.asarray(model(jnp.asarray(ids)))
    scale = np.abs(ref).max()
    err = np.abs(ours - ref)
    # bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); errors compound over a few layers.
    assert err.max() <= 4e-2 * scale, err.max() / scale
    assert err.mean() <= 6e-3 * scale, err.mean() / scale


def test_save_hf_round_trip_gives_identical_transformers_logits(case, tmp_path):
    from transformers import NemotronHForCausalLM

    _, directory, ids, ref = case
    save_hf(load_hf(directory), tmp_path / "rt")
    reloaded = NemotronHForCausalLM.from_pretrained(str(tmp_path / "rt")).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), ref)


def test_sharded_save_with_index_loads_in_both(case, tmp_path):
    from transformers import NemotronHForCausalLM

    _, directory, ids, ref = case
    save_hf(load_hf(directory), tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    np.testing.assert_array_equal(hf_logits(NemotronHForCausalLM.from_pretrained(str(tmp_path / "sharded")), ids), ref)
    ours = np.asarray(load_hf(str(tmp_path / "sharded"))(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_in_memory_model_prefix_names_load(tmp_path):
    """transformers' in-memory state_dict uses `model.` instead of the on-disk `backbone.` prefix."""
    from safetensors.torch import save_file

    model = build_hf_model(seed=3)
    model.config.save_pretrained(str(tmp_path))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids = random_ids(model.config.vocab_size, 2, 19)
    ref = hf_logits(model, ids)
    ours = np.asarray(load_hf(str(tmp_path))(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_padding_mask_matches_transformers(tmp_path):
    """Left-padded batch with an attention mask: the Mamba layers zero padded positions like HF does."""
    model = build_hf_model(seed=5)
    directory = save_hf_model(model, tmp_path)
    ids = random_ids(model.config.vocab_size, 2, 17, seed=2)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ref = hf_logits(model, ids, mask)
    ours = np.asarray(load_hf(directory)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4 * np.abs(ref).max()
