"""Run in a subprocess with 8 simulated CPU devices (see test_sharding.py): sharded training equals the
1-device run, and a checkpoint saved on one mesh restores onto another and continues identically."""

import json
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.quant import apply_precision
from nemojax.sharding import MeshConfig, batch_sharding, make_mesh, shard_model
from nemojax.train.trainer import TrainConfig, make_train_step

CFG = ModelConfig.from_yaml("configs/tiny_moe.yaml").replace(vocab_size=64, hidden_size=64, mamba_num_heads=4,
                                                             mamba_head_dim=16, ssm_state_size=16, head_dim=16,
                                                             chunk_size=16, moe_impl="dense")
TCFG = TrainConfig(steps=3)
BATCH = np.random.default_rng(0).integers(0, 64, (8, 33)).astype(np.int32)


def build(mesh=None, cfg=CFG):
    model = NemotronH(cfg, nnx.Rngs(0))
    # SGD: the update is linear in the gradient, so parameter differences measure the sharded gradients
    # themselves (Adam divides by sqrt(v) and amplifies fp32 reduction-order noise on near-zero gradients).
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    if mesh is not None:
        shard_model(model, mesh)
        shard_model(opt, mesh)
    return model, opt


def train(model, opt, steps, mesh=None):
    step = make_train_step(model.config, TCFG, optax.constant_schedule(1e-2))
    if mesh is None:
        return [float(step(model, opt, BATCH)["loss"]) for _ in range(steps)]
    with jax.set_mesh(mesh):             # as the Trainer does: activation constraints apply
        batch = jax.device_put(BATCH, batch_sharding(mesh))
        return [float(step(model, opt, batch)["loss"]) for _ in range(steps)]


def activation_constraints(model, mesh) -> list:
    """Partition specs of the sharding constraints in the lowered forward pass of the training inputs (32
    positions: they divide over 'tensor', so the residual stream is sequence parallel)."""
    import re

    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        text = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)).lower(
            state, jax.device_put(BATCH[:, :-1], batch_sharding(mesh))).as_text()
    return re.findall(r"sharding_constraint[^\n]*?<@mesh, \[([^\n]*?)\]>", text)


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def main(ckpt_dir):
    out = {"devices": len(jax.devices())}
    ref_model, ref_opt = build()
    ref_losses = train(ref_model, ref_opt, 3)
    mesh_a = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, opt = build(mesh_a)
    spec = model.layers[0].mixer.in_proj_x.kernel[...].sharding.spec
    out["in_proj_x_spec"] = [str(s) for s in spec]
    out["expert_up_spec"] = [str(s) for s in model.layers[1].mixer.up_proj[...].sharding.spec]
    out["constraints"] = activation_constraints(model, mesh_a)
    out["num_blocks"] = len(CFG.pattern)
    losses = train(model, opt, 3, mesh_a)
    out["loss_diff"] = float(np.max(np.abs(np.asarray(losses) - ref_losses)))
    out["param_diff"] = float(max(np.max(np.abs(a - b)) for a, b in zip(params(model), params(ref_model))))
    # save after 2 steps on mesh A, restore on mesh B, take the 3rd step
    model, opt = build(mesh_a)
    train(model, opt, 2, mesh_a)
    tree = {"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt_dir, tree)
    mesh_b = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    model_b, opt_b = build(mesh_b)
    target = {"model": nnx.to_pure_dict(nnx.state(model_b)), "opt": nnx.to_pure_dict(nnx.state(opt_b))}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir, abstract)
    for obj, key in ((model_b, "model"), (opt_b, "opt")):
        st = nnx.state(obj)
        nnx.replace_by_pure_dict(st, restored[key])
        nnx.update(obj, st)
    out["restored_spec"] = [str(s) for s in model_b.layers[0].mixer.in_proj_x.kernel[...].sharding.spec]
    third = train(model_b, opt_b, 1, mesh_b)[0]
    out["resumed_loss_diff"] = abs(third - ref_losses[2])
    out["ref_losses"] = ref_losses
    # quantized training under the same mesh: the quantizers' amax reductions span shards, and the SR noise
    # does not depend on the sharding, so losses match the 1-device run up to fp32 reduction order
    for precision in ("aqt_int8", "nvfp4"):
        losses = []
        for mesh in (None, mesh_a):
            model, opt = build(mesh)
            apply_precision(model, precision)
            losses.append(train(model, opt, 2, mesh))
        out[f"{precision}_loss_diff"] = float(np.max(np.abs(np.subtract(*losses))))
        out[f"{precision}_vs_fp32"] = abs(losses[0][1] - ref_losses[1])
    # scanned layers on the mesh (stacked parameters pinned to their shardings) against unrolled on one device
    unrolled_cfg = CFG.replace(pattern="MEME*MEME")
    runs = []
    for cfg, mesh in ((unrolled_cfg, None), (unrolled_cfg.replace(scan_layers=True), mesh_a)):
        model, opt = build(mesh, cfg)
        runs.append((train(model, opt, 2, mesh), params(model)))
    out["scan_loss_diff"] = float(np.max(np.abs(np.subtract(runs[0][0], runs[1][0]))))
    out["scan_param_diff"] = float(max(np.max(np.abs(a - b)) for a, b in zip(runs[0][1], runs[1][1])))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
