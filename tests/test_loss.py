"""Training losses over a window tokens [batch, seq + 1]: the model reads the first seq tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import NemotronH
from nemojax.config import ModelConfig, RuntimeOptions
from nemojax.train.linear_ce import linear_cross_entropy
from nemojax.train.loss import lm_and_mtp_losses, next_token_ce, output_weight


def _np_ce(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return float((nll * mask).sum() / mask.sum())


def test_next_token_loss_matches_transformers_loss(tmp_path):
    """HF computes its own shifted loss from labels over the whole window; ours reads one token fewer (the
    last input has no target) and must give the same number."""
    pytest.importorskip("transformers")
    import torch
    from hf_helpers import build_hf_model, random_ids, save_hf_model

    from nemojax import load_hf

    hf = build_hf_model(seed=3)
    directory = save_hf_model(hf, tmp_path / "hf")
    tokens = random_ids(hf.config.vocab_size, 2, 18, seed=4)          # seq 17 = 2 chunks of 8 + 1
    with torch.no_grad():
        ids = torch.from_numpy(tokens).long()
        ref = float(hf(ids, labels=ids).loss)
    model = load_hf(directory, dtype="float32")
    main, mtp = lm_and_mtp_losses(model, jnp.asarray(tokens))
    assert mtp == []
    np.testing.assert_allclose(float(main), ref, rtol=1e-5)
    np.testing.assert_allclose(float(next_token_ce(model(jnp.asarray(tokens[:, :-1])), jnp.asarray(tokens))), ref,
                               rtol=1e-5)


def test_mtp_and_padding_targets_line_up():
    """Depth k at input position i is scored against tokens[i + k + 1]; padded tokens count neither as input
    nor as target. Checked against numpy on the model's own logits."""
    cfg = ModelConfig(vocab_size=37, hidden_size=32, pattern="M*", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                      n_groups=1, num_nextn_predict_layers=1, mtp_pattern="*-", runtime=RuntimeOptions(chunk_size=4))
    model = NemotronH(cfg, nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    valid = np.ones_like(tokens)
    valid[1, 8:] = 0                                                  # row 1: 8 real tokens, then padding
    main, mtp = lm_and_mtp_losses(model, jnp.asarray(tokens), jnp.asarray(valid), depth=2)
    main_logits, mtp_logits = model.forward_with_mtp(jnp.asarray(tokens[:, :-1]), depth=2)
    t = tokens.shape[1] - 1
    for k, (ours, logits) in enumerate(zip([main] + mtp, [main_logits] + mtp_logits)):
        # position i (< t - k) predicts tokens[i + k + 1]
        labels = tokens[:, k + 1:]
        mask = valid[:, :t - k] * valid[:, k + 1:]
        expected = _np_ce(np.asarray(logits)[:, :t - k], labels, mask)
        np.testing.assert_allclose(float(ours), expected, rtol=1e-5, err_msg=f"depth {k}")


def test_window_shape_is_checked():
    with pytest.raises(ValueError, match=r"\[batch, seq \+ 1\]"):
        next_token_ce(jnp.zeros((2, 8, 5)), jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"seq \+ 1"):
        lm_and_mtp_losses(None, jnp.zeros((2, 1), jnp.int32))


def _plain_loss(h, w, labels, weights, vocab_major):
    logits = (h @ (w.T if vocab_major else w)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(-jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * weights)


@pytest.mark.parametrize("vocab_major,chunk", [(False, 0), (True, 0), (False, 5), (True, 4), (False, 64)])
def test_fused_output_loss_matches_autodiff(vocab_major, chunk):
    """Value and gradients (hidden, weight, token weights) of the hand-written backward against autodiff of
    the unfused log_softmax(h @ W); chunk 5 does not divide seq 13 (padded tail), 64 exceeds it."""
    k = jax.random.split(jax.random.key(0), 4)
    b, t, d, v = 2, 13, 16, 50
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (v, d) if vocab_major else (d, v)) * 0.3
    labels = jax.random.randint(k[2], (b, t), 0, v)
    weights = jax.random.uniform(k[3], (b, t)) * (jnp.arange(t) < 11)
    fused = lambda h, w, weights: linear_cross_entropy(h, w, labels, weights, vocab_major=vocab_major,  # noqa: E731
                                                        chunk_tokens=chunk)
    plain = lambda h, w, weights: _plain_loss(h, w, labels, weights, vocab_major)  # noqa: E731
    np.testing.assert_allclose(fused(h, w, weights), plain(h, w, weights), rtol=1e-5)
    for got, want in zip(jax.grad(fused, argnums=(0, 1, 2))(h, w, weights),
                         jax.grad(plain, argnums=(0, 1, 2))(h, w, weights)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fused_output_loss_in_bf16_stays_close_to_fp32():
    k = jax.random.split(jax.random.key(1), 3)
    h, w = jax.random.normal(k[0], (2, 8, 32)), jax.random.normal(k[1], (32, 40)) * 0.2
    labels, weights = jax.random.randint(k[2], (2, 8), 0, 40), jnp.full((2, 8), 1 / 16)
    ref = jax.value_and_grad(_plain_loss, argnums=(0, 1))(h, w, labels, weights, False)
    got = jax.value_and_grad(lambda h, w: linear_cross_entropy(h.astype(jnp.bfloat16), w, labels, weights,
                                                               compute_dtype=jnp.bfloat16), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-2)
    assert got[1][0].dtype == jnp.float32 and got[1][1].dtype == jnp.float32      # grads in the inputs' dtypes
    for a, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, r, rtol=0.1, atol=2e-3)


def test_model_losses_fuse_only_plain_output_layers():
    """Tied embeddings fuse (vocab-major table); a quantized lm_head falls back to the model's own logits, and
    the train loss then still equals the unfused cross entropy."""
    from nemojax.quant.recipe import QuantOptions, apply_precision

    cfg = ModelConfig(vocab_size=37, hidden_size=32, pattern="M-", mamba_num_heads=4, mamba_head_dim=8,
                      ssm_state_size=8, n_groups=1, intermediate_size=48, runtime=RuntimeOptions(chunk_size=4))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 37, (2, 9)), jnp.int32)
    tied = NemotronH(cfg.replace(tie_word_embeddings=True), nnx.Rngs(0))
    assert output_weight(tied)[1] is True
    model = NemotronH(cfg, nnx.Rngs(0))
    assert output_weight(model)[1] is False
    apply_precision(model, "fp8", QuantOptions(bf16_first=0, bf16_last=0, quantize_lm_head=True))
    assert output_weight(model) is None
    for m in (tied, model):
        unfused = next_token_ce(m(tokens[:, :-1]), tokens)
        np.testing.assert_allclose(float(lm_and_mtp_losses(m, tokens)[0]), float(unfused), rtol=1e-5)


def test_chunked_model_loss_equals_whole_sequence_loss():
    """chunk_tokens only changes how many logits exist at once: same loss and parameter gradients."""
    cfg = ModelConfig(vocab_size=37, hidden_size=32, pattern="M*", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1,
                      num_nextn_predict_layers=1, mtp_pattern="*-", intermediate_size=48,
                      runtime=RuntimeOptions(chunk_size=4))
    model = NemotronH(cfg, nnx.Rngs(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 37, (2, 12)), jnp.int32)

    def loss(m, chunk):
        main, mtp = lm_and_mtp_losses(m, tokens, depth=1, chunk_tokens=chunk)
        return main + 0.3 * mtp[0]

    whole, g_whole = nnx.value_and_grad(lambda m: loss(m, 0))(model)
    chunked, g_chunked = nnx.value_and_grad(lambda m: loss(m, 4))(model)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_dot_gives_autodiffs_gradients(dtype):
    """The model's nnx.Linear dot (einsum backward on CPU) against autodiff of jax.lax.dot_general."""
    from nemojax.layers.common import linear_dot

    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (2, 7, 12)).astype(dtype)
    w = jax.random.normal(k[1], (12, 5)).astype(dtype)
    cot = jax.random.normal(k[2], (2, 7, 5))
    dims = (((2,), (0,)), ((), ()))

    def f(dot):
        return lambda x, w: jnp.sum(dot(x, w, dims).astype(jnp.float32) * cot)

    np.testing.assert_array_equal(linear_dot(x, w, dims), jax.lax.dot_general(x, w, dims))
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for got, want in zip(jax.grad(f(linear_dot), argnums=(0, 1))(x, w),
                         jax.grad(f(jax.lax.dot_general), argnums=(0, 1))(x, w)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
