"""The Pallas kernels through the real compilers, at the shapes of every published config (configs/*.yaml): the
TPU compiler (libtpu, ahead of time on this CPU host) for TPU v5e and v6e, and the CUDA lowering (Triton). The
SSD kernel forward and forward+backward at each config's Mamba shapes (TPU form on TPU, GPU form for CUDA);
matmul4 for each of its projections at M = 1 and 256, NVFP4 and int4 with each `nemojax pack --group` choice.
Every SSD shape is lowered (Pallas's block rules are checked there); matmul4 is lowered and compiled once per
distinct kernel configuration over all configs (tiles, format, scale block, partial last tiles: what the compiled
kernel and its VMEM use depend on; shapes of one configuration differ only in grid extent). Interpret-mode
tests check the numbers; these check that the compilers accept the kernels. Without libtpu the TPU cases skip,
except in CI, where they fail."""

import functools
import glob
import os

import jax
import jax.numpy as jnp
import pytest
from compile_helpers import need_libtpu
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.quant.pack import PackSpec
from nemojax.ssd import ssd
from pallas_kernels import aot
from pallas_kernels.matmul4 import matmul4, quantize
from pallas_kernels.matmul4.formats import INT4_GROUPS
from pallas_kernels.matmul4.kernel import tiles

CONFIGS = {os.path.basename(p)[:-5]: ModelConfig.from_yaml(p) for p in sorted(glob.glob("configs/*.yaml"))
           if not os.path.basename(p).startswith("tiny")}
TARGETS = ("v5e:2x2", "v6e:2x2", "cuda")
FORMATS = [("nvfp4", 16)] + [("int4", g) for g in INT4_GROUPS]


def ssd_shape(cfg: ModelConfig) -> tuple:
    return cfg.mamba_head_dim, cfg.ssm_state_size, cfg.runtime.chunk_size, cfg.mamba_num_heads, cfg.n_groups


SSD_SHAPES = sorted({ssd_shape(cfg) for cfg in CONFIGS.values()})


@functools.cache
def linear_shapes(name: str) -> list:
    """[K, N] of every nnx.Linear kernel of the config (lm_head included: the tied embedding table packs as the
    same [D, V])."""
    model = nnx.eval_shape(lambda: NemotronH(CONFIGS[name], nnx.Rngs(0)))
    return sorted({tuple(node.kernel.shape) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)})


def lowered(target: str, fn, *args):
    if target == "cuda":
        return aot.lower_for_cuda(fn, *args)
    need_libtpu()
    return aot.lower_for_tpu(fn, *args, topology=target)


@functools.cache
def compiled(target: str, fn, *args):
    out = lowered(target, fn, *args)
    return out if target == "cuda" else out.compile()


@functools.cache
def ssd_fn(target: str, chunk: int, backward: bool):
    form = "gpu" if target == "cuda" else "tpu"
    fwd = functools.partial(ssd, impl="pallas", chunk_size=chunk, form=form, interpret=False)
    if not backward:
        return fwd
    return jax.grad(lambda *a: jnp.sum(fwd(*a)[0]) + jnp.sum(fwd(*a)[1]), argnums=tuple(range(7)))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=lambda s: "P{}-N{}-Q{}-H{}-G{}".format(*s))
def test_ssd_kernel_compiles(shape, target):
    p, n, q, h, g = shape
    b, t = 1, 2 * q + 44                          # two whole chunks and a padded tail
    args = (jax.ShapeDtypeStruct((b, t, h, p), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h), jnp.float32),
            jax.ShapeDtypeStruct((h,), jnp.float32), jax.ShapeDtypeStruct((b, t, g, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t, g, n), jnp.bfloat16), jax.ShapeDtypeStruct((h,), jnp.float32),
            jax.ShapeDtypeStruct((b, h, p, n), jnp.float32))
    for backward in (False, True):
        out = compiled(target, ssd_fn(target, q, backward), *args)
        if target != "cuda":                      # the kernel's cost estimate reaches the compiler's cost model
            assert out.cost_analysis()["flops"] >= 2 * t * h * q * (n + p)


@functools.cache
def matmul4_fn(target: str):
    return functools.partial(matmul4, target="gpu" if target == "cuda" else "tpu", interpret=False)


@functools.cache
def matmul4_cases() -> dict:
    """{kernel configuration: (target, m, k, n, fmt, block) of the first projection that produces it}, over
    every config, projection, format, M in (1, 256) and target. A configuration is what the compiled kernel (its
    code and VMEM) depends on: tiles, format, scale block, padding and partial last tiles; shapes of one
    configuration differ only in grid extent, so each is compiled once per run."""
    out = {}
    for name in sorted(CONFIGS):
        for k, n in linear_shapes(name):
            for fmt, group in FORMATS:
                block = PackSpec(fmt, group).block_for(k)
                if block is None:
                    continue                      # test_every_projection_has_a_4bit_block_size fails instead
                half = jax.eval_shape(lambda: quantize(jnp.zeros((k, n), jnp.bfloat16), fmt, block)).data.shape[0]
                for target in TARGETS:
                    for m in (1, 256):
                        bm, bn, bk, n_pad = tiles(m, half, n, block, "gpu" if target == "cuda" else "tpu")
                        config = (target, fmt, block, bm, bn, bk, n_pad != n, half % bk != 0, n_pad % bn != 0)
                        out.setdefault(config, (target, m, k, n, fmt, block))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_projection_has_a_4bit_block_size(name):
    for k, n in linear_shapes(name):
        for fmt, group in FORMATS:
            assert PackSpec(fmt, group).block_for(k) is not None, (name, k, n, fmt, group)


MATMUL4_SHARDS = 6                                # per target: the configurations spread over the test workers


@pytest.mark.parametrize("shard", range(MATMUL4_SHARDS))
@pytest.mark.parametrize("target", TARGETS)
def test_matmul4_compiles_for_every_kernel_configuration(target, shard):
    """Every kernel configuration the published configs' projections produce (matmul4_cases; this shard's share)
    lowers, and on TPU compiles with its cost estimate."""
    cases = [c for c in matmul4_cases().values() if c[0] == target][shard::MATMUL4_SHARDS]
    assert cases or shard > 0
    for _, m, k, n, fmt, block in cases:
        w = jax.eval_shape(lambda: quantize(jnp.zeros((k, n), jnp.bfloat16), fmt, block))
        out = lowered(target, matmul4_fn(target), jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w)
        if target != "cuda":
            assert out.compile().cost_analysis()["flops"] >= 2 * m * k * n, (k, n, fmt, block)


MOE_SHAPES = sorted({(cfg.moe_latent_size or cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok)
                     for cfg in CONFIGS.values() if cfg.n_routed_experts})


@pytest.mark.parametrize("target", TARGETS[:2])
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "W{}-I{}-K{}".format(*s))
def test_moe_grouped_matmul_compiles(shape, target):
    """moe_impl='gmm' (the megablox kernel, TPU's 'auto'), forward and backward, at each MoE config's expert
    widths; 64 experts stand in for the config's count (the kernel's blocks do not depend on it)."""
    from nemojax.layers.moe import Routing, experts_gmm

    width, inter, k = shape
    experts, tokens = 64, 200                          # 200 * k rows: not a multiple of the row tile

    def loss(x, up, down, weights, chosen):
        routing = Routing(weights, chosen, jnp.zeros((tokens, experts), jnp.float32))
        return jnp.sum(experts_gmm(x, up, down, routing))

    args = (jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((experts, width, inter), jnp.bfloat16),
            jax.ShapeDtypeStruct((experts, inter, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((tokens, k), jnp.float32), jax.ShapeDtypeStruct((tokens, k), jnp.int32))
    out = compiled(target, jax.grad(loss, argnums=(0, 1, 2)), *args)
    text = out.as_text()
    assert "tpu_custom_call" in text                   # the Mosaic kernel, not the interpreter's loop
    # forward up-projection, then data and weight gradients of both projections: five grouped matmuls (the
    # down-projection's forward output is dead under grad of a sum)
    flops, routed = out.cost_analysis()["flops"], 5 * 2 * tokens * k * width * inter
    assert routed <= flops < 1.5 * routed              # not the dense every-expert product ragged_dot lowers to
