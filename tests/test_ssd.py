"""SSD implementations (through the one dispatcher, nemojax.ssd.ssd) against an independent float64 numpy
recurrence and against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import ssd as S


def numpy_recurrence(x, dt, A, B, C, D, state):
    """float64 reference written directly from the recurrence in nemojax/ssd's docstring."""
    b, t, h, p = x.shape
    g = B.shape[2]
    st = state.astype(np.float64).copy()
    ys = np.zeros((b, t, h, p))
    for i in range(t):
        for hh in range(h):
            gg = hh // (h // g)
            st[:, hh] = (np.exp(dt[:, i, hh] * A[hh])[:, None, None] * st[:, hh]
                         + (dt[:, i, hh, None] * x[:, i, hh])[:, :, None] * B[:, i, gg, None, :])
            ys[:, i, hh] = np.einsum("bpn,bn->bp", st[:, hh], C[:, i, gg]) + D[hh] * x[:, i, hh]
    return ys, st


def make_inputs(b, t, h, p, g, n, seed=0, realistic=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, h, p)).astype(np.float32)
    if realistic:  # Nemotron-like: dt in [1e-3, 0.1], A in [-16, -1]
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (b, t, h))).astype(np.float32)
        A = -rng.uniform(1, 16, h).astype(np.float32)
    else:
        dt = np.log1p(np.exp(rng.standard_normal((b, t, h)))).astype(np.float32)
        A = -np.exp(rng.uniform(-1, 1.5, h)).astype(np.float32)
    B = rng.standard_normal((b, t, g, n)).astype(np.float32)
    C = rng.standard_normal((b, t, g, n)).astype(np.float32)
    D = rng.standard_normal(h).astype(np.float32)
    s0 = rng.standard_normal((b, h, p, n)).astype(np.float32)
    return x, dt, A, B, C, D, s0


SHAPES = [  # (batch, seq, heads, head_dim, groups, state, chunk)
    (2, 37, 6, 4, 3, 5, 8),      # several chunks, ragged tail, 2 heads per group
    (1, 64, 4, 8, 1, 16, 16),    # exact multiple, single group
    (3, 5, 8, 2, 4, 3, 16),      # shorter than one chunk
    (2, 130, 4, 4, 2, 8, 128),   # one full chunk plus 2 tokens
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_all_impls_match_numpy(shape, with_state):
    b, t, h, p, g, n, q = shape
    x, dt, A, B, C, D, s0 = make_inputs(b, t, h, p, g, n, seed=t)
    s0 = s0 if with_state else np.zeros_like(s0)
    y_ref, final_ref = numpy_recurrence(x, dt, A, B, C, D, s0)
    scale = max(1.0, np.abs(y_ref).max())
    init = s0 if with_state else None
    for name in ("naive", "associative", "chunked"):
        y, final = S.ssd(x, dt, A, B, C, D, init, impl=name, chunk_size=q)
        assert y.shape == (b, t, h, p) and final.shape == (b, h, p, n), name
        np.testing.assert_allclose(np.asarray(y) / scale, y_ref / scale, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(final), final_ref, atol=1e-5 * max(1, np.abs(final_ref).max()),
                                   err_msg=name)


def test_step_by_step_matches_chunked():
    b, t, h, p, g, n = 2, 23, 6, 4, 2, 8
    x, dt, A, B, C, D, s0 = make_inputs(b, t, h, p, g, n, seed=3, realistic=True)
    y_ref, final_ref = S.ssd(x, dt, A, B, C, D, s0, chunk_size=8)
    state, ys = jnp.asarray(s0), []
    for i in range(t):
        y, state = S.step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
        ys.append(y)
    np.testing.assert_allclose(np.stack(ys, 1), y_ref, atol=1e-5)
    np.testing.assert_allclose(state, final_ref, atol=1e-5)


def test_chunked_continues_from_a_split_point():
    """Prefill continuation: two calls threading the state equal one call over the whole sequence."""
    x, dt, A, B, C, D, _ = make_inputs(1, 45, 4, 4, 2, 8, seed=4, realistic=True)
    y_full, f_full = S.ssd(x, dt, A, B, C, D, chunk_size=16)
    y1, s1 = S.ssd(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], D, chunk_size=16)
    y2, s2 = S.ssd(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], D, initial_state=s1, chunk_size=16)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y_full, atol=1e-5)
    np.testing.assert_allclose(s2, f_full, atol=1e-5)


def test_chunked_gradients_match_naive():
    x, dt, A, B, C, D, s0 = make_inputs(2, 19, 4, 3, 2, 4, seed=5, realistic=True)
    rng = np.random.default_rng(9)
    wy = rng.standard_normal((2, 19, 4, 3)).astype(np.float32)
    ws = rng.standard_normal((2, 4, 3, 4)).astype(np.float32)

    def loss(fn, *args):
        y, final = fn(*args)
        return jnp.sum(y * wy) + jnp.sum(final * ws)

    argnums = tuple(range(7))
    g_ref = jax.grad(lambda *a: loss(lambda *b: S.ssd(*b, impl="naive"), *a), argnums)(x, dt, A, B, C, D, s0)
    g_chk = jax.grad(lambda *a: loss(lambda *b: S.ssd(*b, chunk_size=8), *a), argnums)(x, dt, A, B, C, D, s0)
    for name, a, r in zip("x dt A B C D s0".split(), g_chk, g_ref):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * max(1, np.abs(r).max()), err_msg=name)


def test_bad_shapes_raise():
    x, dt, A, B, C, D, s0 = make_inputs(1, 8, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="divisible by groups"):
        S.ssd(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="dt must be"):
        S.ssd(x, dt[:, :4], A, B, C)
    with pytest.raises(ValueError, match="initial_state"):
        S.ssd(x, dt, A, B, C, initial_state=s0[:, :2])
    for name in ("fast", "xla"):            # no alias names
        with pytest.raises(ValueError, match="unknown ssd impl"):
            S.ssd(x, dt, A, B, C, impl=name)
    with pytest.raises(ValueError, match="whole chunks"):   # implementations take what the dispatcher prepares
        S.IMPLS["chunked"](x, dt, A, B, C, s0, chunk_size=3)
