"""Device meshes and parameter / batch shardings.

Mesh axes (data, fsdp, tensor, expert) with AxisType.Auto (GSPMD-style propagation; jax.make_mesh defaults to
Explicit in 0.10, where a plain model fails with 'specify out_sharding'). Sizes come from the config, -1 fills
the remaining devices.

Parameter specs follow the usual Megatron/MaxText layout, by parameter name:
    column-parallel  [in, out] -> P('fsdp', 'tensor')   q/k/v, MLP up, Mamba in_proj_{z,x,B,C,dt}, latent fc1
    row-parallel     [in, out] -> P('tensor', 'fsdp')   o_proj, MLP down, Mamba out_proj, latent fc2
    per-channel      [C]       -> P('tensor')            Mamba conv biases, A_log, D, dt_bias, gated-norm weight
    conv weights     [K, C]    -> P(None, 'tensor')
    experts          [E, ...]  -> P('expert', ...)
    embeddings [V, D] -> P('tensor', 'fsdp'); lm_head [D, V] -> P('fsdp', 'tensor'); norms replicated.
Because the Mamba projections are stored per component (z, x, B, C, dt), sharding their output axis over
'tensor' splits each component by heads (x, z, dt) or groups (B, C) and never puts two components in one
shard. An axis is dropped from a spec when it does not divide that dimension (the parameter is then
replicated along it), so every config shards without errors; GSPMD inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.expert]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or n_devices % known:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not fit {n_devices} devices")
    if fill:
        sizes[fill[0]] = n_devices // known
    elif known != n_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} uses {known} devices, but {n_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[list] = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


COLUMN = ("q_proj", "k_proj", "v_proj", "up_proj", "in_proj_z", "in_proj_x", "in_proj_B", "in_proj_C",
          "in_proj_dt", "fc1_latent_proj", "eh_proj")
ROW = ("o_proj", "down_proj", "out_proj", "fc2_latent_proj")
PER_CHANNEL = ("A_log", "D", "dt_bias")


def logical_spec(path: tuple, shape: tuple) -> tuple:
    """Mesh axes per dimension for the parameter at `path` (before divisibility checks)."""
    names = [str(p) for p in path]
    leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
    if "experts" not in names and owner == "mixer" and leaf in ("up_proj", "down_proj") and len(shape) == 3:
        # stacked routed experts [E, in, out]
        return ("expert", "fsdp", "tensor") if leaf == "up_proj" else ("expert", "tensor", "fsdp")
    if leaf == "gate":
        return ("fsdp", None)
    if leaf == "embedding":
        return ("tensor", "fsdp")
    if owner == "lm_head":
        return ("fsdp", "tensor")
    if owner in COLUMN:
        return ("fsdp", "tensor") if leaf == "kernel" else ("tensor",)
    if owner in ROW:
        return ("tensor", "fsdp") if leaf == "kernel" else (None,)
    if owner.startswith("conv_"):
        return (None, "tensor") if leaf == "weight" else ("tensor",)
    if leaf in PER_CHANNEL:
        return ("tensor",)
    if owner == "norm" and len(names) >= 3 and names[-3] == "mixer":
        return ("tensor",)                      # the Mamba gated norm over inner channels
    return (None,) * len(shape)


def fit_spec(axes: tuple, shape: tuple, mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (or are size 1)."""
    fitted = []
    for dim, axis in zip(shape, axes):
        size = mesh.shape[axis] if axis else 1
        fitted.append(axis if axis and size > 1 and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(state, mesh: Mesh):
    """NamedShardings matching an nnx.State (or any pytree keyed like one) of parameters."""
    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        keys = tuple(k for k in keys if k not in ("value", "raw_value"))
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fit_spec(logical_spec(keys, shape), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, state)


# logical activation axes -> mesh axes. The residual stream is sharded over the batch only: tensor-parallel
# layers gather it at their input and reduce at their output, as in Megatron's non-sequence-parallel layout.
ACTIVATION_AXES = {"batch": ("data", "fsdp"), "seq": None, "embed": None, "vocab": ("tensor",)}


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """Pins activation x to the mesh axes of its logical axes (ACTIVATION_AXES) when a mesh is set with
    jax.set_mesh (the trainer sets its mesh around each step); a no-op without one. Axes that do not divide
    their dimension are left unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = []
    for dim, name in zip(x.shape, logical):
        kept = tuple(a for a in ACTIVATION_AXES.get(name) or () if mesh.shape.get(a, 1) > 1)
        size = int(np.prod([mesh.shape[a] for a in kept])) if kept else 1
        spec.append(kept if kept and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch over data x fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def shard_model(model, mesh: Mesh):
    """Places every variable of an NNX model on the mesh by its spec (in place)."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model
