"""Run with 8 simulated CPU devices (test_moe.py): one MoE layer (values and gradients) on several meshes and
expert implementations against the same layer without a mesh, plus where the lowered program sorts tokens."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.moe import MoE
from nemojax.sharding import MeshConfig, batch_sharding, make_mesh, shard_model

CFG = ModelConfig(vocab_size=64, hidden_size=32, pattern="E", n_routed_experts=8, num_experts_per_tok=3,
                  moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5,
                  n_group=4, topk_group=2)
MESHES = {"data4_tensor2": MeshConfig(data=4, tensor=2), "fsdp2_tensor2_expert2": MeshConfig(data=1, fsdp=2,
          tensor=2, expert=2), "data2_expert4": MeshConfig(data=2, expert=4), "expert8": MeshConfig(data=1, expert=8)}
X = jax.random.normal(jax.random.key(2), (8, 7, CFG.hidden_size))


def loss(module, x, impl):
    out, _ = module(x, impl=impl)
    return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape)))


def run(cfg, impl, mesh=None):
    moe = MoE(cfg, nnx.Rngs(0))
    moe.e_score_correction_bias[...] = jax.random.normal(jax.random.key(1), (cfg.n_routed_experts,)) * 0.05
    fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    if mesh is None:
        value, (grads, dx) = fn(moe, X, impl)
    else:
        shard_model(moe, mesh)
        with jax.set_mesh(mesh):
            x = jax.device_put(X, jax.sharding.NamedSharding(mesh, batch_sharding(mesh).spec + (None,)))
            value, (grads, dx) = fn(moe, x, impl)
    return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)] + [np.asarray(dx)]


def sorts_per_device(cfg, mesh) -> list:
    """Shapes of the sort operations in the compiled (partitioned) forward: per-device token counts when each
    shard routes its own tokens."""
    moe = MoE(cfg, nnx.Rngs(0))
    shard_model(moe, mesh)
    graphdef, state = nnx.split(moe)
    with jax.set_mesh(mesh):
        x = jax.device_put(X, jax.sharding.NamedSharding(mesh, batch_sharding(mesh).spec + (None,)))
        text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, impl="ragged")[0]).lower(state, x).compile().as_text()
    return sorted(set(re.findall(r"= \(?s32\[(\d+)\][^\n]*? sort\(", text)))


def main():
    out = {}
    for latent in (None, 12):
        cfg = CFG.replace(moe_latent_size=latent)
        # the latent projections sit outside the expert computation: one implementation checks them on meshes
        for impl in ("dense", "ragged", "capacity", "gmm") if latent is None else ("ragged",):
            ref_value, ref_grads = run(cfg, impl)
            for name, mesh_cfg in MESHES.items():
                value, grads = run(cfg, impl, make_mesh(mesh_cfg))
                out[f"{latent}/{impl}/{name}"] = {
                    "value": abs(value - ref_value) / abs(ref_value),
                    "grads": max(float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) + 1e-30)
                                 for a, b in zip(grads, ref_grads))}
    out["sort_sizes"] = {name: sorts_per_device(CFG, make_mesh(m)) for name, m in MESHES.items()}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
