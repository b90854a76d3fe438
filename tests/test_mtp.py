"""MTP head: input shift against a hand-written reference, dependence structure, and a short training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemojax.config import ModelConfig, RuntimeOptions
from nemojax.model import NemotronH
from nemojax.train.loss import lm_and_mtp_losses

CFG = ModelConfig(vocab_size=32, hidden_size=32, pattern="M*E", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_shared_expert_intermediate_size=16, num_nextn_predict_layers=1, mtp_pattern="*E",
                  runtime=RuntimeOptions(chunk_size=8))


def np_rms(x, w, eps=1e-5):
    return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def test_mtp_input_uses_next_embedding_and_current_hidden():
    model = NemotronH(CFG, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, CFG.vocab_size)
    _, (mtp_logits,) = model.forward_with_mtp(ids, depth=1)
    assert mtp_logits.shape == (2, 11, CFG.vocab_size)
    # hand-written MTP input for positions 0..9: [enorm(E[t_{i+1}]), hnorm(h_i)] @ eh_proj
    h = np.asarray(model.forward(ids)[0])
    table = np.asarray(model.embeddings.embedding[...])
    blk = model.mtp[0]
    e_next = np_rms(table[np.asarray(ids)[:, 1:]], np.asarray(blk.enorm.weight[...]))
    h_cur = np_rms(h[:, :-1], np.asarray(blk.hnorm.weight[...]))
    x = np.concatenate([e_next, h_cur], -1) @ np.asarray(blk.eh_proj.kernel[...])
    x = jnp.asarray(x)
    for block in blk.layers:
        x, _ = block(x)
    ref = np.asarray(model.logits(blk.final_layernorm(x)))
    np.testing.assert_allclose(np.asarray(mtp_logits)[:, :-1], ref, atol=1e-4)


def test_mtp_dependence_structure():
    """Changing token j changes MTP logits from position j-1 on, but main logits only from position j."""
    model = NemotronH(CFG, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (1, 12), 0, CFG.vocab_size)
    j = 7
    changed = ids.at[0, j].set((ids[0, j] + 5) % CFG.vocab_size)
    main_a, (mtp_a,) = model.forward_with_mtp(ids, depth=1)
    main_b, (mtp_b,) = model.forward_with_mtp(changed, depth=1)
    diff_main = np.abs(np.asarray(main_a - main_b)).max(-1)[0]
    diff_mtp = np.abs(np.asarray(mtp_a - mtp_b)).max(-1)[0]
    assert (diff_main[:j] < 1e-6).all() and diff_main[j] > 1e-4
    assert (diff_mtp[:j - 1] < 1e-6).all() and diff_mtp[j - 1] > 1e-4


def test_mtp_depth_two_reuses_the_block():
    model = NemotronH(CFG.replace(mtp_depth=2), nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, CFG.vocab_size)
    _, mtp = model.forward_with_mtp(ids)
    assert len(mtp) == 2 and mtp[1].shape == mtp[0].shape
    assert not np.allclose(mtp[0], mtp[1])


def _train(mtp_weight, steps=70, seed=0):
    """Arithmetic sequences t_{i+1} = t_i + stride (mod V): next and next-but-one tokens are learnable."""
    model = NemotronH(CFG, nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(seed)

    def batch():
        start = rng.integers(0, CFG.vocab_size, (16, 1))
        stride = rng.integers(1, 4, (16, 1))
        return jnp.asarray((start + stride * np.arange(24)) % CFG.vocab_size, jnp.int32)

    @nnx.jit
    def step(model, opt, ids):
        def loss_fn(model):
            main, mtp = lm_and_mtp_losses(model, ids, depth=1)
            return main + mtp_weight * mtp[0], (main, mtp[0])
        (_, (main, mtp)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return main, mtp

    history = [step(model, opt, batch()) for _ in range(steps)]
    return [(float(a), float(b)) for a, b in history]


def test_mtp_loss_trains_the_head_without_hurting_main_loss():
    with_mtp = _train(mtp_weight=0.3)
    without = _train(mtp_weight=0.0)
    mtp_start, mtp_end = with_mtp[0][1], np.mean([m for _, m in with_mtp[-5:]])
    assert mtp_end < 0.5 * mtp_start, (mtp_start, mtp_end)
    # without the MTP loss the head is untrained: its loss stays far higher
    assert mtp_end < 0.7 * np.mean([m for _, m in without[-5:]])
    main_with, main_without = np.mean([a for a, _ in with_mtp[-5:]]), np.mean([a for a, _ in without[-5:]])
    assert main_with < 0.5 * with_mtp[0][0]
    assert main_with < main_without * 1.15 + 0.05, (main_with, main_without)
