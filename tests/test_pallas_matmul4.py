"""4-bit matmul: E2M1 rounding and decoding on hand-computed values, packing round trips, the Pallas kernel
(interpret mode) against the pure-JAX reference for both formats, and clear errors on illegal shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul4 import dequantize, matmul4, matmul4_reference, quantize
from pallas_kernels.matmul4.formats import e2m1_decode, e2m1_round, pack_nibbles, unpack_nibbles


def test_e2m1_rounding_hand_cases():
    x = jnp.asarray([0.0, 0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 6.0, 7.0, 100.0, -0.75, -5.0])
    want = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -1.0, -4.0]
    #        ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; |x|>6 saturates
    codes, values = e2m1_round(x)
    np.testing.assert_array_equal(np.asarray(values), want)
    np.testing.assert_array_equal(np.asarray(e2m1_decode(codes)), want)
    assert int(codes[-2]) == 8 | 2 and int(codes[-1]) == 8 | 6
    np.testing.assert_array_equal(np.asarray(e2m1_decode(jnp.arange(16, dtype=jnp.uint8))),
                                  [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])


def test_pack_unpack_round_trip():
    codes = jax.random.randint(jax.random.key(0), (32, 8), 0, 16).astype(jnp.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (16, 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[16, 0]) << 4)


def test_nvfp4_scales_and_zero_blocks():
    w = jnp.zeros((32, 4)).at[:16, 0].set(jnp.linspace(-3, 3, 16)).at[:16, 1].set(1e-3)
    p = quantize(w, "nvfp4")
    np.testing.assert_allclose(float(p.tensor_scale), 3.0 / (6 * 448))
    # block amax 3 -> scale 3 / 6 / tensor_scale = 448 (E4M3 max, exact); an all-zero block has scale 0
    assert float(p.scales[0, 0].astype(jnp.float32)) == 448.0 and float(p.scales[1, 0].astype(jnp.float32)) == 0.0
    dq = dequantize(p)
    np.testing.assert_array_equal(np.asarray(dq[16:]), 0.0)
    np.testing.assert_allclose(float(dq[15, 0]), 3.0, rtol=1e-6)                 # the block max is exact
    err = np.abs(np.asarray(dq[:16, 1]) - 1e-3) / 1e-3
    assert err.max() < 0.07                                  # a small block keeps its own (E4M3-rounded) scale


@pytest.mark.parametrize("fmt,group", [("nvfp4", 16), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 7, 128])
def test_kernel_matches_reference(fmt, group, m):
    k = 48 if fmt == "nvfp4" else 2 * group * 3          # nvfp4: K = 48 is not a multiple of the 32-row pair
    n = 384
    w = jax.random.normal(jax.random.key(0), (k, n))
    x = jax.random.normal(jax.random.key(1), (m, k))
    p = quantize(w, fmt, group)
    ref = matmul4_reference(x, p)
    got = matmul4(x, p, compute_dtype=jnp.float32, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    bf16 = matmul4(x.astype(jnp.bfloat16), p, interpret=True)                  # bf16 compute, fp32 accumulation
    assert float(jnp.abs(bf16 - ref).max()) < 2e-2 * float(jnp.abs(ref).max())
    # the quantized weight is close to the original and far smaller
    assert float(jnp.abs(dequantize(p) - w).max()) < 0.2 * float(jnp.abs(w).max())
    if k % (2 * p.block) == 0:                             # no padding rows: 4.5 (nvfp4) / 4.25 bits per value
        assert p.nbytes <= 0.3 * 2 * k * n


def test_illegal_shapes_raise():
    with pytest.raises(ValueError, match="NVFP4 needs K divisible by 16"):
        quantize(jnp.ones((24, 8)), "nvfp4")
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize(jnp.ones((64, 8)), "int4", 48)
    with pytest.raises(ValueError, match="K divisible by 64"):
        quantize(jnp.ones((96, 8)), "int4", 64)
    with pytest.raises(ValueError, match="unknown 4-bit format"):
        quantize(jnp.ones((64, 8)), "fp4")
    with pytest.raises(ValueError, match=r"x must be \[M, 32\]"):
        matmul4(jnp.ones((2, 16)), quantize(jnp.ones((32, 8)), "nvfp4"))


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("fmt,group,k,n", [("int4", 128, 6400, 600), ("nvfp4", 16, 1568, 300)])
def test_partial_tiles_and_padding_match_reference(target, fmt, group, k, n):
    """Shapes whose tiles do not divide them: on TPU the last K tile is masked and the last N tile cut off
    (int4-128: K'/2 = 3200 in tiles of 1024, N = 600 in tiles of 256); on GPU N is padded to a power-of-two
    tile. Both targets' tilings in interpret mode against the reference."""
    p = quantize(jax.random.normal(jax.random.key(2), (k, n)), fmt, group)
    x = jax.random.normal(jax.random.key(3), (5, k))
    ref = matmul4_reference(x, p)
    got = matmul4(x, p, compute_dtype=jnp.float32, target=target, interpret=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    with pytest.raises(ValueError, match="target must be one of"):
        matmul4(x, p, target="npu")
