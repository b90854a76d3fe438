"""Layers against independent numpy references, and the Mamba mixer's state continuation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.attention import gqa_attention
from nemojax.layers.common import Mode
from nemojax.layers.mamba2 import CausalDepthwiseConv, Mamba2Mixer
from nemojax.layers.norm import GatedGroupRMSNorm, RMSNorm
from nemojax.model import NemotronH

TINY = ModelConfig.from_yaml("configs/tiny.yaml")


def numpy_attention(q, k, v, key_mask):
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    allowed = np.tril(np.ones((t, t), bool))[None, None] & key_mask[:, None, None, :].astype(bool)
    s = np.where(allowed, s, -np.inf)
    with np.errstate(invalid="ignore"):  # fully padded query rows are NaN here and not compared
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_gqa_attention_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 9, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0
    ours = np.asarray(gqa_attention(q, k, v, key_mask=jnp.asarray(mask)))
    ref = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(ours[1, 3:], ref[1, 3:], atol=1e-5)


def test_norms_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    z = rng.standard_normal((3, 12)).astype(np.float32)
    norm = RMSNorm(12, 1e-5)
    norm.weight[...] = rng.standard_normal(12).astype(np.float32)
    w = np.asarray(norm.weight[...])
    np.testing.assert_allclose(norm(x), w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5), rtol=1e-5)
    gated = GatedGroupRMSNorm(12, 3, 1e-5)
    gated.weight[...] = w
    g = (x * z / (1 + np.exp(-z))).reshape(3, 3, 4)
    ref = (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(3, 12) * w
    np.testing.assert_allclose(gated(x, z), ref, rtol=1e-5, atol=1e-6)


def test_causal_conv_matches_numpy_and_carries_prefix():
    conv = CausalDepthwiseConv(5, 4, True, jnp.float32, nnx.Rngs(0), "mamba_heads")
    x = np.random.default_rng(2).standard_normal((2, 11, 5)).astype(np.float32)
    w, b = np.asarray(conv.weight[...]), np.asarray(conv.bias[...])
    xp = np.concatenate([np.zeros((2, 3, 5), np.float32), x], 1)
    ref = np.stack([b + sum(w[k] * xp[:, t + k] for k in range(4)) for t in range(11)], 1)
    out, prefix = conv(jnp.asarray(x))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_array_equal(prefix, x[:, -3:])
    out1, p1 = conv(jnp.asarray(x[:, :6]))
    out2, _ = conv(jnp.asarray(x[:, 6:]), p1)
    np.testing.assert_allclose(np.concatenate([out1, out2], 1), ref, atol=1e-5)


def test_mamba_mixer_state_continuation():
    """A forward split in two, threading MambaState, equals the whole-sequence forward (the basis of decode);
    so do one-token DECODE steps and the per-position states of a VERIFY pass (EXTEND continues a state)."""
    mixer = Mamba2Mixer(TINY, nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 50, TINY.hidden_size))
    empty = mixer.init_cache(2, 50, jnp.float32)
    train, none = mixer(x)
    assert none is None
    full, state = mixer(x, cache=empty, mode=Mode.PREFILL)
    np.testing.assert_allclose(full, train, atol=1e-6)
    a, s1 = mixer(x[:, :29], cache=empty, mode=Mode.PREFILL)
    b, s2 = mixer(x[:, 29:], cache=s1, mode=Mode.EXTEND)
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, atol=1e-5)
    np.testing.assert_allclose(s2.ssm, state.ssm, atol=1e-5)
    steps, s = [], s1
    for i in range(29, 50):   # token-by-token
        y, s = mixer(x[:, i:i + 1], cache=s, mode=Mode.DECODE)
        steps.append(y)
    np.testing.assert_allclose(np.concatenate(steps, 1), full[:, 29:], atol=1e-5)
    verified, states = mixer(x[:, 29:], cache=s1, mode=Mode.VERIFY)
    np.testing.assert_allclose(verified, full[:, 29:], atol=1e-5)
    for i in (0, 7, 20):    # rewinding to position 29 + i gives the state after that token
        kept, (_, s_i) = states.rewind(None, i), mixer(x[:, 29:30 + i], cache=s1, mode=Mode.EXTEND)
        for got, want in zip(kept, s_i):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_model_is_causal_and_jits():
    model = NemotronH(TINY, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 40), 0, TINY.vocab_size)
    logits = nnx.jit(lambda m, x: m(x))(model, ids)
    changed = ids.at[:, 30:].set((ids[:, 30:] + 1) % TINY.vocab_size)
    logits2 = model(changed)
    np.testing.assert_allclose(logits[:, :30], logits2[:, :30], atol=1e-5)
    assert not np.allclose(logits[:, 30:], logits2[:, 30:])
    np.testing.assert_allclose(logits, model(ids), atol=1e-5)


def test_init_follows_recipe():
    mixer = Mamba2Mixer(TINY, nnx.Rngs(0))
    A = np.exp(np.asarray(mixer.A_log[...]))
    assert ((A >= 1) & (A <= 16)).all()
    dt = np.log1p(np.exp(np.asarray(mixer.dt_bias[...])))
    assert ((dt >= TINY.time_step_min * 0.999) & (dt <= TINY.time_step_max * 1.001)).all()
    np.testing.assert_array_equal(mixer.D[...], 1.0)
    std_out = np.asarray(mixer.out_proj.kernel[...]).std()
    std_in = np.asarray(mixer.in_proj_x.kernel[...]).std()
    assert std_out < std_in / 2   # output projections scaled by 1/sqrt(2 L)


def test_blocked_attention_equals_unblocked_with_offsets_and_padding():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 37, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 45, 2, 8)).astype(np.float32)   # 8 cached keys before the 37 queries
    v = rng.standard_normal((2, 45, 2, 8)).astype(np.float32)
    mask = np.ones((2, 45), bool)
    mask[0, :11] = False
    blocked = gqa_attention(q, k, v, key_mask=jnp.asarray(mask), query_block=5)
    explicit = gqa_attention(q, k, v, key_mask=jnp.asarray(mask), q_positions=jnp.arange(8, 45))
    real = np.ones((2, 37), bool)
    real[0, :3] = False      # queries at positions 8..10 of row 0 see only padded keys: no defined output
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(explicit)[real], atol=1e-6)
    assert np.isfinite(np.asarray(blocked)).all()   # but they stay finite
    # streaming over blocks of 16 keys (online softmax) equals scoring all keys at once, padded rows included
    for softcap in (0.0, 5.0):
        whole = gqa_attention(q, k, v, key_mask=jnp.asarray(mask), q_positions=jnp.arange(8, 45), softcap=softcap,
                              key_block=None)
        streamed = gqa_attention(q, k, v, key_mask=jnp.asarray(mask), q_positions=jnp.arange(8, 45),
                                 softcap=softcap, key_block=16)
        np.testing.assert_allclose(np.asarray(streamed), np.asarray(whole), atol=2e-6)
