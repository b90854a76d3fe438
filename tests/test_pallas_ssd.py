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
# several chunks (48, 32), a padded tail (37), shorter than a chunk (5); one, two and four B/C groups
@pytest.mark.parametrize("b,h,g,t,p,n,q", [(1, 4, 1, 48, 16, 8, 16), (2, 8, 4, 32, 8, 8, 8), (2, 4, 2, 37, 8, 16, 16),
                                           (2, 4, 2, 5, 8, 16, 16)])
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


def recurrence64(x, dt, A, B, C, D, s0):
    """The SSD recurrence written out with jnp, for float64 inputs (an independent reference)."""
    rep = x.shape[2] // B.shape[2]

    def step(state, xs):
        x_t, dt_t, B_t, C_t = xs
        Bh, Ch = jnp.repeat(B_t, rep, 1), jnp.repeat(C_t, rep, 1)
        state = jnp.exp(dt_t * A)[:, :, None, None] * state + (dt_t[..., None] * x_t)[..., None] * Bh[:, :, None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, Ch) + D[:, None] * x_t

    final, ys = jax.lax.scan(step, s0, tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    return jnp.moveaxis(ys, 0, 1), final


@pytest.mark.parametrize("form", FORMS)
def test_exact_at_extreme_decays_against_float64(form):
    """dt log-uniform in [1e-4, 10] and A in [-16, -0.5] (per-chunk log decays down to ~-2e4), chunk 128, a
    length that is not a whole number of chunks, grouped B/C and an initial state: outputs, final states and
    the gradients of x, dt, A, B, C, D and the initial state within 1e-5 of a float64 recurrence."""
    rng = np.random.default_rng(0)
    b, t, h, g, p, n = 1, 300, 4, 2, 8, 16
    inputs = [rng.standard_normal((b, t, h, p)), np.exp(rng.uniform(np.log(1e-4), np.log(10), (b, t, h))),
              -rng.uniform(0.5, 16, h), rng.standard_normal((b, t, g, n)), rng.standard_normal((b, t, g, n)),
              rng.standard_normal(h), rng.standard_normal((b, h, p, n))]
    wy, ws = rng.standard_normal((b, t, h, p)), rng.standard_normal((b, h, p, n))

    def loss(fn, dtype):
        def f(*args):
            y, s = fn(*args)
            return jnp.sum(y * wy.astype(dtype)) + jnp.sum(s * ws.astype(dtype))
        return f

    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in inputs]
        want = [np.asarray(v) for v in (*recurrence64(*args64),
                                        *jax.grad(loss(recurrence64, np.float64), argnums=range(7))(*args64))]
    kernel = lambda *a: ssd(*a, impl="pallas", chunk_size=128, form=form, interpret=True)
    args32 = [jnp.asarray(a, jnp.float32) for a in inputs]
    got = [*kernel(*args32), *jax.grad(loss(kernel, np.float32), argnums=range(7))(*args32)]
    for name, a, w in zip(("y", "final state", "dx", "ddt", "dA", "dB", "dC", "dD", "d initial state"), got, want):
        err = np.abs(np.asarray(a, np.float64) - w).max() / np.abs(w).max()
        assert err <= 1e-5, (name, err)
