"""MoE / LatentMoE: parity with transformers, sparse paths vs the dense reference (values and gradients),
capacity dropping, router statistics and balancing, conversion layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.moe import MoE, experts_dense, route
from nemojax.model import NemotronH
from nemojax.train.loss import moe_aux_loss, update_expert_bias

MOE_CFG = ModelConfig(vocab_size=64, hidden_size=32, pattern="E", n_routed_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5,
                      n_group=4, topk_group=2)


def random_moe(cfg, seed=0):
    moe = MoE(cfg, nnx.Rngs(seed))
    moe.e_score_correction_bias[...] = jax.random.normal(jax.random.key(seed + 1), (cfg.n_routed_experts,)) * 0.05
    return moe


@pytest.mark.parametrize("latent", [None, 12])
def test_sparse_paths_equal_dense_reference_with_gradients(latent):
    cfg = MOE_CFG.replace(moe_latent_size=latent)
    moe = random_moe(cfg)
    x = jax.random.normal(jax.random.key(2), (3, 7, cfg.hidden_size))

    def loss(module, x, impl):
        out, _ = module(x, impl=impl)
        return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape)))

    grad_fn = nnx.value_and_grad(loss, argnums=(0, 1))
    ref_val, ref_grad = grad_fn(moe, x, "dense")
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grad))
    for impl in ("ragged", "gmm", "capacity"):     # gmm: the TPU kernel, run by the Pallas interpreter here
        val, grad = grad_fn(moe, x, impl)
        np.testing.assert_allclose(val, ref_val, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=impl)


def test_capacity_drops_exactly_the_overflow():
    """With capacity C, each expert keeps its first C assignments in token order; the rest contribute 0."""
    cfg = MOE_CFG.replace(n_group=1, topk_group=1, moe_capacity_factor=0.5)
    moe = random_moe(cfg, seed=3)
    x = jax.random.normal(jax.random.key(4), (1, 20, cfg.hidden_size))
    flat = x.reshape(-1, cfg.hidden_size)
    r = route(flat, moe.gate[...], moe.e_score_correction_bias[...], cfg)
    cap = int(np.ceil(0.5 * 20 * 3 / 8))
    experts = np.asarray(r.experts)
    seen, keep = {}, np.zeros_like(experts, bool)
    for t in range(experts.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[t, j]
            seen[e] = seen.get(e, 0) + 1
            keep[t, j] = seen[e] <= cap
    assert not keep.all()   # the test must actually drop something
    kept = r._replace(weights=jnp.where(keep, r.weights, 0.0))
    expected = experts_dense(flat, moe.up_proj[...], moe.down_proj[...], kept) + moe.shared_experts.ffn(flat)
    np.testing.assert_allclose(moe(x, impl="capacity")[0].reshape(-1, cfg.hidden_size), expected, atol=1e-5)


def test_group_limited_routing_only_picks_from_top_groups():
    cfg = MOE_CFG
    moe = random_moe(cfg, seed=5)
    x = jax.random.normal(jax.random.key(6), (40, cfg.hidden_size))
    r = route(x, moe.gate[...], moe.e_score_correction_bias[...], cfg)
    choice = np.asarray(r.scores + moe.e_score_correction_bias[...])
    groups = choice.reshape(40, 4, 2)
    group_scores = np.sort(groups, -1)[..., -2:].sum(-1)
    top_groups = np.argsort(-group_scores, -1)[:, :2]
    for t in range(40):
        assert set(np.asarray(r.experts[t]) // 2) <= set(top_groups[t])
    w = np.asarray(r.weights)
    np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-5)   # normalised then scaled
    np.testing.assert_allclose(w, np.take_along_axis(np.asarray(r.scores), np.asarray(r.experts), 1)
                               / np.take_along_axis(np.asarray(r.scores), np.asarray(r.experts), 1).sum(-1,
                                                                                                   keepdims=True)
                               * 2.5, rtol=1e-5)   # weights from unbiased scores


def test_router_load_and_bias_balancing():
    cfg = MOE_CFG.replace(n_group=1, topk_group=1, moe_aux_loss_coef=0.01)
    model = NemotronH(cfg.replace(pattern="EE"), nnx.Rngs(0))
    moe = model.layers[0].mixer
    moe.e_score_correction_bias[...] = jnp.arange(8.0) * 0.2        # heavily favours the last experts
    ids = jax.random.randint(jax.random.key(1), (4, 32), 0, 64)
    model(ids)
    load = np.asarray(moe.router_load[...])
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
    spread_before = load.max() - load.min()
    assert float(moe.aux_loss[...]) > 0
    np.testing.assert_allclose(moe_aux_loss(model), moe.aux_loss[...] + model.layers[1].mixer.aux_loss[...])
    history = []
    for _ in range(80):   # sign updates move each bias by `rate`; the initial spread is 1.4
        update_expert_bias(model, rate=0.03)
        model(ids)
        history.append(np.asarray(moe.router_load[...]))
    # a fixed-step sign controller oscillates around balance: judge the load averaged over the last steps
    load_after = np.mean(history[-20:], axis=0)
    assert load_after.max() - load_after.min() < spread_before / 3, (spread_before, load_after)


def test_moe_model_jits_and_is_causal():
    cfg = MOE_CFG.replace(pattern="M*E", mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, chunk_size=8)
    model = NemotronH(cfg, nnx.Rngs(0))
    from nemojax.model import make_forward
    ids = jax.random.randint(jax.random.key(1), (2, 21), 0, 64)
    out = make_forward(model)(ids)
    changed = model(ids.at[:, 15:].set(3))
    np.testing.assert_allclose(out[:, :15], changed[:, :15], atol=1e-5)


def test_experts_on_a_mesh_equal_one_device_and_sort_local_tokens():
    """Each data shard routes its own tokens (layers/moe.py experts_on_mesh): dense, ragged, capacity and gmm
    experts (and ragged with LatentMoE) on meshes splitting tokens, the expert MLP width (tensor) and the
    experts themselves, equal the one-device layer in values and gradients; the compiled program sorts only
    the local shard's assignments (left to GSPMD, every device sorted all 168)."""
    import os

    from process_helpers import launch, result

    worker = os.path.join(os.path.dirname(__file__), "moe_mesh_worker.py")
    out = result(launch(worker, xla_flags="--xla_force_host_platform_device_count=8"))
    sorts = out.pop("sort_sizes")
    assert len(out) == (4 + 1) * 4                                       # impls (latent: ragged) x meshes
    for case, diff in out.items():
        assert diff["value"] < 1e-5 and diff["grads"] < 1e-4, (case, diff)
    assignments = 8 * 7 * 3
    # the batch splits over data x fsdp x expert; an expert shard sorts its group's token blocks one at a time
    assert sorts["data4_tensor2"] == [str(assignments // 4)], sorts       # 4 token shards
    assert sorts["data2_expert4"] == [str(assignments // 8)], sorts
    assert sorts["fsdp2_tensor2_expert2"] == [str(assignments // 4)], sorts
    assert sorts["expert8"] == [str(assignments // 8)], sorts
