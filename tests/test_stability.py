"""Training-stability attention options (QK-norm, QKV-norm, softmax capping) against a numpy reference, their
cached decode, that HF export refuses them, and remat policies (identical gradients)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ConfigError, ModelConfig
from nemojax.layers.attention import Attention
from nemojax.layers.common import Mode
from nemojax.model import NemotronH
from nemojax.train.loss import lm_and_mtp_losses

TINY = ModelConfig.from_yaml("configs/tiny.yaml")


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def attention_reference(layer: Attention, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Causal GQA written out in numpy: per-head norms, 1/sqrt(d) scores, optional tanh cap, softmax."""
    b, t, _ = x.shape
    h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ np.asarray(layer.q_proj.kernel[...])).reshape(b, t, h, hd)
    k = (x @ np.asarray(layer.k_proj.kernel[...])).reshape(b, t, kvh, hd)
    v = (x @ np.asarray(layer.v_proj.kernel[...])).reshape(b, t, kvh, hd)
    eps = cfg.layer_norm_epsilon
    if cfg.attn_qk_norm or cfg.attn_qkv_norm:
        q, k = rms(q, np.asarray(layer.q_norm.weight[...]), eps), rms(k, np.asarray(layer.k_norm.weight[...]), eps)
    if cfg.attn_qkv_norm:
        v = rms(v, np.asarray(layer.v_norm.weight[...]), eps)
    k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    if cfg.attn_softcap:
        scores = cfg.attn_softcap * np.tanh(scores / cfg.attn_softcap)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, h * hd)
    return out @ np.asarray(layer.o_proj.kernel[...])


OPTIONS = [dict(attn_qk_norm=True), dict(attn_qkv_norm=True), dict(attn_softcap=2.0),
           dict(attn_qk_norm=True, attn_softcap=5.0)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
def test_attention_options_match_numpy(options):
    cfg = TINY.replace(**options)
    layer = Attention(cfg, nnx.Rngs(0))
    for norm in (layer.q_norm, layer.k_norm, layer.v_norm):        # non-trivial norm weights
        if norm is not None:
            norm.weight[...] = jax.random.uniform(jax.random.key(3), norm.weight.shape, minval=0.5, maxval=1.5)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 9, cfg.hidden_size))) * 3   # large scores: cap bites
    got = np.asarray(layer(jnp.asarray(x))[0])
    want = attention_reference(layer, x, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if options.get("attn_softcap"):                                 # the cap changes the result
        plain = attention_reference(layer, x, cfg.replace(attn_softcap=0.0))
        assert np.abs(plain - want).max() > 1e-3 * np.abs(want).max()


def test_qkv_norm_removes_the_attention_pre_norm_and_decode_matches():
    cfg = TINY.replace(attn_qkv_norm=True, attn_softcap=3.0, pattern="M*-*", chunk_size=16)
    model = NemotronH(cfg, nnx.Rngs(0))
    assert model.layers[1].norm is None and model.layers[0].norm is not None
    assert model.layers[1].mixer.v_norm is not None
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    full = np.asarray(model(ids))
    hidden, cache = model.forward(ids[:, :10], cache=model.init_cache(2, 24), mode=Mode.PREFILL)
    got = [np.asarray(model.logits(hidden))]
    for t in range(10, 24):
        hidden, cache = model.forward(ids[:, t:t + 1], cache=cache, mode=Mode.DECODE)
        got.append(np.asarray(model.logits(hidden)))
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-4 * np.abs(full).max())


def test_stability_options_cannot_be_exported_to_hf():
    with pytest.raises(ConfigError, match="attn_qk_norm cannot be written to an HF config"):
        TINY.replace(attn_qk_norm=True).to_hf_dict()
    with pytest.raises(ConfigError, match="attn_softcap must be >= 0"):
        TINY.replace(attn_softcap=-1.0)
    with pytest.raises(ConfigError, match="remat must be one of"):
        TINY.replace(remat="everything")


@pytest.mark.parametrize("pattern", ["M*-", "ME"])
def test_remat_policies_give_the_same_gradients(pattern):
    cfg = TINY.replace(pattern=pattern, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, chunk_size=16)
    ids = jax.random.randint(jax.random.key(2), (2, 33), 0, cfg.vocab_size)
    grads = {}
    for policy in ("none", "block", "dots"):
        model = NemotronH(cfg.replace(remat=policy), nnx.Rngs(0))
        grads[policy] = jax.tree.leaves(nnx.grad(lambda m: lm_and_mtp_losses(m, ids, depth=0)[0])(model))
    for policy in ("block", "dots"):
        for a, b in zip(grads["none"], grads[policy]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
