"""Pallas SSD kernels (TPU form and GPU form, interpret mode on CPU) against the per-token reference and
nemojax's naive SSD: forward, final states and gradients, groups, initial states, ragged lengths, bf16, and the
model end to end with ssd_impl='pallas'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.ssd import ssd_naive
from pallas_kernels.ssd import ssd_core, ssd_core_reference, ssd_pallas

FORMS = ["tpu", "gpu"]


def core_inputs(b, h, g, t, p, n, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return (jax.random.normal(k[0], (b, h, t, p)), -jax.random.uniform(k[1], (b, h, t), maxval=0.6),
            jax.random.normal(k[2], (b, g, t, n)), jax.random.normal(k[3], (b, g, t, n)),
            jax.random.normal(k[4], (b, h, p, n)))


def rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,h,g,t,p,n,q", [(2, 4, 2, 64, 8, 16, 16), (1, 4, 1, 48, 16, 8, 16),
                                           (2, 8, 4, 32, 8, 8, 8)])
def test_core_matches_reference_with_gradients(form, b, h, g, t, p, n, q):
    args = core_inputs(b, h, g, t, p, n)
    y_ref, h_ref = ssd_core_reference(*args)
    y, h_out = ssd_core(*args, q, form, True)
    assert rel(y, y_ref) < 1e-5 and rel(h_out, h_ref) < 1e-5
    wy, wh = jax.random.normal(jax.random.key(9), y.shape), jax.random.normal(jax.random.key(8), h_out.shape)

    def loss(fn):
        def f(*a):
            y, s = fn(*a)
            return jnp.sum(y * wy) + jnp.sum(s * wh)
        return f

    got = jax.grad(loss(lambda *a: ssd_core(*a, q, form, True)), argnums=range(5))(*args)
    want = jax.grad(loss(ssd_core_reference), argnums=range(5))(*args)
    for name, a, w in zip(("u", "l", "B", "C", "h0"), got, want):
        assert a.shape == w.shape and rel(a, w) < 1e-5, (name, rel(a, w))


def model_inputs(t, h=4, g=2, p=8, n=16, b=2, seed=1):
    k = jax.random.split(jax.random.key(seed), 7)
    return dict(x=jax.random.normal(k[0], (b, t, h, p)),
                dt=jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 1),
                A=-jnp.exp(jax.random.normal(k[2], (h,)) * 0.5), B=jax.random.normal(k[3], (b, t, g, n)),
                C=jax.random.normal(k[4], (b, t, g, n)), D=jax.random.normal(k[5], (h,)),
                initial_state=jax.random.normal(k[6], (b, h, p, n)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("t", [37, 16, 5])
def test_ssd_pallas_matches_naive_at_any_length(form, t):
    inp = model_inputs(t)
    y_ref, s_ref = ssd_naive(**inp)
    y, s = ssd_pallas(**inp, chunk_size=16, form=form, interpret=True)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5

    def loss(fn):
        def f(x, dt, A, B, C, D, s0):
            y, s = fn(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=s0)
            return jnp.sum(jnp.sin(y)) + jnp.sum(s ** 2)
        return f

    args = tuple(inp.values())
    got = jax.grad(loss(lambda **k: ssd_pallas(**k, chunk_size=16, form=form, interpret=True)),
                   argnums=range(7))(*args)
    want = jax.grad(loss(ssd_naive), argnums=range(7))(*args)
    for name, a, w in zip(inp, got, want):
        assert rel(a, w) < 2e-5, (name, rel(a, w))


def test_bf16_inputs_accumulate_in_fp32():
    inp = model_inputs(40)
    bf = {k: v.astype(jnp.bfloat16) if k in ("x", "B", "C") else v for k, v in inp.items()}
    y_ref, _ = ssd_naive(**{k: v.astype(jnp.float32) for k, v in bf.items()})
    y, s = ssd_pallas(**bf, chunk_size=16, interpret=True)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel(y, y_ref) < 1e-5


def test_bad_shapes_raise():
    inp = model_inputs(8)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_pallas(**{**inp, "B": inp["B"][:, :, :1].repeat(3, 2), "C": inp["C"][:, :, :1].repeat(3, 2)})
    with pytest.raises(ValueError, match="inconsistent SSD shapes"):
        ssd_pallas(**{**inp, "dt": inp["dt"][:, :4]})


def test_model_with_pallas_ssd_matches_xla():
    cfg = ModelConfig.from_yaml("configs/tiny.yaml").replace(chunk_size=16, pattern="M*M-")
    ids = jax.random.randint(jax.random.key(0), (2, 45), 0, cfg.vocab_size)
    xla = NemotronH(cfg, nnx.Rngs(0))
    pallas = NemotronH(cfg.replace(ssd_impl="pallas"), nnx.Rngs(0))
    want, got = np.asarray(xla(ids)), np.asarray(pallas(ids))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
