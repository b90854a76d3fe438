"""Pallas SSD kernels (TPU form and GPU form, interpret mode on CPU) through nemojax.ssd's dispatcher against
its naive reference: forward, final states and gradients, groups, initial states, ragged lengths, bf16, and the
model end to end with ssd_impl='pallas'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.ssd import ssd

FORMS = ["tpu", "gpu"]


def rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def model_inputs(t, h=4, g=2, p=8, n=16, b=2, seed=1):
    k = jax.random.split(jax.random.key(seed), 7)
    return dict(x=jax.random.normal(k[0], (b, t, h, p)),
                dt=jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 1),
                A=-jnp.exp(jax.random.normal(k[2], (h,)) * 0.5), B=jax.random.normal(k[3], (b, t, g, n)),
                C=jax.random.normal(k[4], (b, t, g, n)), D=jax.random.normal(k[5], (h,)),
                initial_state=jax.random.normal(k[6], (b, h, p, n)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,h,g,t,p,n,q", [(2, 4, 2, 64, 8, 16, 16), (1, 4, 1, 48, 16, 8, 16), (2, 8, 4, 32, 8, 8, 8),
                                           (2, 4, 2, 37, 8, 16, 16), (2, 4, 2, 16, 8, 16, 16), (2, 4, 2, 5, 8, 16, 16)])
def test_pallas_matches_naive_with_gradients(form, b, h, g, t, p, n, q):
    inp = model_inputs(t, h, g, p, n, b)
    pallas = dict(impl="pallas", chunk_size=q, form=form, interpret=True)
    y_ref, s_ref = ssd(**inp, impl="naive")
    y, s = ssd(**inp, **pallas)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5

    def loss(**options):
        def f(x, dt, A, B, C, D, s0):
            y, s = ssd(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=s0, **options)
            return jnp.sum(jnp.sin(y)) + jnp.sum(s ** 2)
        return f

    args = tuple(inp.values())
    got = jax.grad(loss(**pallas), argnums=range(7))(*args)
    want = jax.grad(loss(impl="naive"), argnums=range(7))(*args)
    for name, a, w in zip(inp, got, want):
        assert a.shape == w.shape and rel(a, w) < 2e-5, (name, rel(a, w))


def test_bf16_inputs_accumulate_in_fp32():
    inp = model_inputs(40)
    bf = {k: v.astype(jnp.bfloat16) if k in ("x", "B", "C") else v for k, v in inp.items()}
    y_ref, _ = ssd(**{k: v.astype(jnp.float32) for k, v in bf.items()}, impl="naive")
    y, s = ssd(**bf, impl="pallas", chunk_size=16, interpret=True)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel(y, y_ref) < 1e-5


def test_model_with_pallas_ssd_matches_xla():
    cfg = ModelConfig.from_yaml("configs/tiny.yaml").replace(chunk_size=16, pattern="M*M-")
    ids = jax.random.randint(jax.random.key(0), (2, 45), 0, cfg.vocab_size)
    xla = NemotronH(cfg, nnx.Rngs(0))
    pallas = NemotronH(cfg.replace(ssd_impl="pallas"), nnx.Rngs(0))
    want, got = np.asarray(xla(ids)), np.asarray(pallas(ids))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
