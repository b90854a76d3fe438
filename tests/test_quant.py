"""Low-precision recipes: NVFP4 quantizer against hand-computed values, RHT, stochastic rounding, the NVFP4 /
FP8 / AQT training matmuls, precision selection on the model, and the late switch back to high precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ConfigError, ModelConfig
from nemojax.layers.common import linear_dot
from nemojax.model import NemotronH
from nemojax.quant import QuantOptions, apply_precision, fp8, nvfp4
from nemojax.quant.aqt import aqt_matmul
from nemojax.quant.recipe import precision_of

TINY = ModelConfig.from_yaml("configs/tiny.yaml").replace(hidden_size=64, intermediate_size=128, mamba_num_heads=4,
                                                          mamba_head_dim=16, ssm_state_size=16, head_dim=16,
                                                          chunk_size=16)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------- NVFP4 quantizer, hand-computed
def test_nvfp4_ties_round_to_even_on_te_thresholds():
    # amax 6 -> s_enc = 448, block scale e4m3(448) = 448, so values are quantized unscaled onto the E2M1 grid
    x = jnp.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, 0.3, 5.1, 0.0, 2.9, -4.4, 1.1])
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -2.0, 0.5, 6.0, 0.0, 3.0, -4.0, 1.0]
    np.testing.assert_allclose(np.asarray(nvfp4.fake_quant(x)), want, rtol=1e-6, atol=0)   # s_dec = 1/448 in fp32


def test_nvfp4_e4m3_block_scale_rounding_and_saturation():
    # block 1 sets the global amax 6 (s_enc = 448); block 2's amax 1.65 wants scale 1.65 * 448 / 6 = 123.2,
    # which E4M3 (step 8 in [64, 128)) rounds down to 120: the amax then scales to 6.16 and saturates at 6.
    b1 = jnp.zeros(16).at[0].set(6.0)
    b2 = jnp.zeros(16).at[0].set(1.65).at[1].set(0.5).at[2].set(-0.1)
    out = np.asarray(nvfp4.fake_quant(jnp.concatenate([b1, b2])))
    unit = 120.0 / 448.0                                    # value of one E2M1 unit in block 2
    np.testing.assert_allclose(out[16:19], [6 * unit, 2 * unit, -0.5 * unit], rtol=1e-6)
    # 0.5 / unit = 1.87 -> 2 ; 0.1 / unit = 0.37 -> 0.5


def test_nvfp4_zero_blocks_and_padding():
    x = jnp.concatenate([jnp.zeros(16), jnp.linspace(-3, 3, 21)])        # a zero block and a ragged tail
    out = nvfp4.fake_quant(x)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(np.asarray(out[:16]), 0.0)
    np.testing.assert_array_equal(np.asarray(nvfp4.fake_quant(jnp.zeros((3, 5)))), 0.0)
    assert rel(out[16:], x[16:]) < 0.15


def test_nvfp4_agrees_with_the_independent_packing_code():
    from pallas_kernels.matmul4 import dequantize, quantize

    w = jax.random.normal(jax.random.key(0), (256, 96)) * jnp.exp(jax.random.normal(jax.random.key(1), (1, 96)))
    ours = nvfp4.fake_quant(w, axis=0)                                     # 1x16 blocks along K
    packed = dequantize(quantize(w, "nvfp4"))
    # the packer divides by the scale where TE multiplies by its reciprocal and decodes in another order:
    # values agree to fp32 rounding except (rarely) an element sitting exactly on a rounding tie
    assert float(np.mean(~np.isclose(np.asarray(ours), np.asarray(packed), rtol=1e-5, atol=0))) < 1e-3
    np.testing.assert_allclose(np.asarray(ours), np.asarray(packed), atol=float(jnp.max(jnp.abs(w))) / 6)


def test_2d_weight_blocks_give_identical_weights_in_fprop_and_dgrad():
    w = jax.random.normal(jax.random.key(0), (48, 40))
    r2d, r1d = nvfp4.NVFP4Recipe(), nvfp4.NVFP4Recipe(weight_2d=False)
    np.testing.assert_array_equal(np.asarray(nvfp4.quantize_weight(w, r2d, 0)),
                                  np.asarray(nvfp4.quantize_weight(w, r2d, 1)))
    assert bool(jnp.any(nvfp4.quantize_weight(w, r1d, 0) != nvfp4.quantize_weight(w, r1d, 1)))
    # through the custom VJP: x = I makes fprop return the fprop weight exactly (one-hot rows quantize
    # exactly); without SR, dgrad must then equal Q(dy) @ that weight^T.
    eye = jnp.eye(48)
    recipe = nvfp4.NVFP4Recipe(stochastic_rounding=False)
    w_fprop = nvfp4.nvfp4_matmul(eye, w, jax.random.key(0), recipe)
    dy = jax.random.normal(jax.random.key(2), (48, 40))
    _, vjp = jax.vjp(lambda x: nvfp4.nvfp4_matmul(x, w, jax.random.key(0), recipe), eye)
    np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np.asarray(nvfp4.fake_quant(dy) @ w_fprop.T),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- RHT and stochastic rounding
def test_rht_is_orthogonal_and_wgrad_is_unchanged_in_exact_arithmetic():
    h = np.asarray(nvfp4.rht_matrix(), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-12)
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(37, 12)), rng.normal(size=(37, 20))           # T = 37: padded to 48
    pad = lambda a: np.pad(a, ((0, 11), (0, 0)))                                      # noqa: E731
    hx = (pad(x).T.reshape(12, 3, 16) @ h).reshape(12, 48).T                 # transform along T in float64
    hdy = (pad(dy).T.reshape(20, 3, 16) @ h).reshape(20, 48).T
    np.testing.assert_allclose(hx.T @ hdy, x.T @ dy, atol=1e-12)
    # the fp32 implementation computes the same transform
    np.testing.assert_allclose(np.asarray(nvfp4.rht(jnp.asarray(x, jnp.float32), 0)), hx, atol=1e-5)
    # and the recipe's wgrad with RHT but no quantization error would equal x^T dy: check the unquantized path
    got = np.asarray(nvfp4.rht(jnp.asarray(x, jnp.float32), 0).T @ nvfp4.rht(jnp.asarray(dy, jnp.float32), 0))
    np.testing.assert_allclose(got, x.T @ dy, rtol=1e-4, atol=1e-4)


def test_stochastic_rounding_is_unbiased():
    # every block holds a 6, so each block scale is exact and nothing saturates (saturation clips, biasing)
    x = jax.random.uniform(jax.random.key(0), (4, 16), minval=-6.0, maxval=6.0).at[:, 0].set(6.0)
    draws = jax.vmap(lambda k: nvfp4.fake_quant(x, key=k))(jax.random.split(jax.random.key(1), 4000))
    # each draw picks one of the two grid neighbours; the mean converges to x (standard error <= 1 / sqrt(4000))
    nearest = nvfp4.fake_quant(x)
    single_err = float(jnp.mean(jnp.abs(draws[0] - x)))
    mean_err = float(jnp.max(jnp.abs(draws.mean(0) - x)))
    assert mean_err < 0.05 < single_err
    assert float(jnp.max(jnp.abs(nearest - x))) > 10 * mean_err            # RNE is biased per element
    draws, x = draws.reshape(4000, -1), x.reshape(-1)
    lo = jnp.min(draws, 0)
    hi = jnp.max(draws, 0)
    assert bool(jnp.all((lo <= x + 1e-6) & (x - 1e-6 <= hi) & (hi - lo <= 2.0 + 1e-6)))


# ---------------------------------------------------------------- training matmuls
def _grads(f, x, w):
    return jax.grad(lambda x, w: jnp.sum(f(x, w) * jnp.cos(jnp.arange(w.shape[1]))), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("name", ["nvfp4", "fp8_e4m3", "fp8_e5m2", "aqt8", "aqt4"])
def test_quantized_matmuls_are_close_to_exact(name):
    x = jax.random.normal(jax.random.key(0), (64, 96))
    w = jax.random.normal(jax.random.key(1), (96, 80)) * 0.1
    f = {"nvfp4": lambda x, w: nvfp4.nvfp4_matmul(x, w, jax.random.key(3)),
         "fp8_e4m3": lambda x, w: fp8.fp8_matmul(x, w),
         "fp8_e5m2": lambda x, w: fp8.fp8_matmul(x, w, "e5m2"),
         "aqt8": lambda x, w: aqt_matmul(x, w, jax.random.key(3), (8, 8, 8)),
         "aqt4": lambda x, w: aqt_matmul(x, w, jax.random.key(3), (4, 8, 8))}[name]
    bound = {"nvfp4": 0.25, "fp8_e4m3": 0.06, "fp8_e5m2": 0.12, "aqt8": 0.03, "aqt4": 0.25}[name]
    exact = x @ w
    y = f(x, w)
    assert 0 < rel(y, exact) < bound
    for g, g0 in zip(_grads(f, x, w), _grads(lambda x, w: x @ w, x, w)):
        assert 0 < rel(g, g0) < bound


def test_fp8_hand_computed_current_scaling():
    # amax 2 -> scale 224: 1.0 -> 224 (exact E4M3), 0.3 -> 67.2 -> 64 (E4M3 step 8 in [64, 128)) -> 0.2857
    out = np.asarray(fp8.fake_quant(jnp.array([2.0, 1.0, 0.3, -0.3])))
    np.testing.assert_allclose(out, [2.0, 1.0, 64 / 224, -64 / 224], rtol=1e-6)
    # E5M2 (57344 / amax): 0.3 * 28672 = 8601.6 -> step 1024 in [8192, 16384) -> 8192
    np.testing.assert_allclose(np.asarray(fp8.fake_quant(jnp.array([2.0, 0.3]), "e5m2"))[1], 8192 / 28672,
                               rtol=1e-6)


def test_gradient_rounding_depends_on_the_key_only():
    x = jax.random.normal(jax.random.key(0), (32, 64))
    w = jax.random.normal(jax.random.key(1), (64, 48))
    dy = jax.random.normal(jax.random.key(2), (32, 48))
    for f in (nvfp4.nvfp4_matmul, lambda x, w, k: aqt_matmul(x, w, k, (8, 8, 8))):
        dx = [jax.vjp(lambda x_, k=k: f(x_, w, k), x)[1](dy)[0]
              for k in (jax.random.key(5), jax.random.key(5), jax.random.key(6))]
        np.testing.assert_array_equal(np.asarray(dx[0]), np.asarray(dx[1]))
        assert bool(jnp.any(dx[0] != dx[2]))


# ---------------------------------------------------------------- precision on the model
def test_precision_selection_per_recipe():
    model = NemotronH(TINY, nnx.Rngs(0))                 # pattern M-M*-M- : 7 blocks, attention at 3
    apply_precision(model, "fp8")
    assert precision_of(model) == {0: "high", 1: "high", 2: "fp8", 3: "fp8", 4: "fp8", 5: "high", 6: "high"}
    apply_precision(model, "nvfp4")                      # last round(8 * 7 / 62) = 1 block and attention stay
    assert precision_of(model) == {0: "nvfp4", 1: "nvfp4", 2: "nvfp4", 3: "high", 4: "nvfp4", 5: "nvfp4",
                                   6: "high"}
    apply_precision(model, "nvfp4", QuantOptions(bf16_first=1, bf16_last=0, quantize_attention=True))
    assert precision_of(model) == {0: "high", **{i: "nvfp4" for i in range(1, 7)}}
    apply_precision(model, "aqt_int4")
    assert set(precision_of(model).values()) == {"aqt"}
    assert model.lm_head.dot_general is linear_dot      # the output layer stays high precision
    apply_precision(model, "fp8", QuantOptions(quantize_lm_head=True))
    assert model.lm_head.dot_general.kind == "fp8"
    apply_precision(model, "bf16")
    assert set(precision_of(model).values()) == {"high"}
    assert all(lin.dot_general is linear_dot for _, lin in nnx.iter_graph(model) if isinstance(lin, nnx.Linear))
    with pytest.raises(ConfigError, match="precision must be one of"):
        apply_precision(model, "int3")
    with pytest.raises(ConfigError, match="aqt_bits"):
        QuantOptions(aqt_bits=(3, 8, 8))
    with pytest.raises(ConfigError, match="stochastic rounding"):       # refused before any trace
        apply_precision(model, "aqt_int8", QuantOptions(stochastic_rounding=False))


def test_forward_switches_back_to_high_precision():
    model = NemotronH(TINY, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, TINY.vocab_size)
    exact = model(ids)
    opts = QuantOptions(bf16_forward_from_step=100, bf16_last=0, quantize_attention=True)
    apply_precision(model, "nvfp4", opts, step=99)
    assert rel(model(ids), exact) > 1e-3
    apply_precision(model, "nvfp4", opts, step=100)
    assert set(precision_of(model).values()) == {"nvfp4"}         # gradients stay NVFP4
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(exact), rtol=1e-5, atol=1e-5)
