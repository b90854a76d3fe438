"""Device meshes, and shardings from logical axes.

Mesh axes (data, fsdp, tensor, expert) with AxisType.Auto (GSPMD-style propagation; jax.make_mesh defaults to
Explicit in 0.10, where a plain model fails with 'specify out_sharding'). Sizes come from the config, -1 fills
the remaining devices.

Every parameter declares its logical axes where it is created (layers/common.py: `param`, `linear`; stored as
the variable's `logical_axes` metadata, which optimizer states inherit), and RULES maps each logical axis to
mesh axes, the usual Megatron/MaxText layout: column-parallel projections [embed, heads/mlp/mamba_heads] ->
P('fsdp', 'tensor'), row-parallel ones the reverse, experts over 'expert', norms replicated. Because the Mamba
projections are stored per component (z, x, B, C, dt), sharding their output axis over 'tensor' splits each
component by heads or groups and never puts two components in one shard. A mesh axis is dropped from a spec
when it does not divide that dimension (the array is then replicated along it), so every config shards; GSPMD
inserts the collectives. A variable with dimensions but no logical axes is an error, never silently replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes (None: replicated). One table for parameters, activations and the arrays of
# inference caches (each cache type declares its LOGICAL_AXES; generation pins them with constrain_cache).
RULES = {
    # activations and caches. Between blocks the residual stream's positions are split over 'tensor' too
    # (Megatron's sequence parallelism, "act_seq"): each block all-gathers its normed input to whole sequences
    # ("seq") for the tensor-parallel mixer and reduce-scatters the mixer's output back (together the bytes of
    # the one all-reduce of the unsplit layout; MoE layers psum inside their shard_map, and the constraint then
    # only slices), so the block inputs that remat keeps, the norms and the residual adds are 1/tensor per
    # chip. The expert axis is data parallel outside the MoE layers (which gather each expert group's tokens:
    # layers/moe.py)
    "batch": ("data", "fsdp", "expert"), "seq": None, "act_seq": ("tensor",), "act_embed": None,
    "cache_seq": None,
    "vocab": ("tensor",),                  # embedding rows, lm_head columns, logits
    "embed": ("fsdp",),                    # the hidden size of weights (FSDP)
    "heads": ("tensor",), "kv_heads": ("tensor",), "head_dim": None,
    "mlp": ("tensor",),
    "mamba_heads": ("tensor",), "ssm_groups": ("tensor",), "conv_kernel": None,
    "experts": ("expert",), "expert_embed": ("fsdp",), "expert_mlp": ("tensor",), "router": None,
    "latent": ("tensor",),                 # LatentMoE's projection width
    "concat_embed": ("tensor",),           # MTP eh_proj input: [embedding | hidden]
    "norm": None,
    "layers": None,                        # the stacked axis of scanned layers (layers/block.py)
}


BATCH_AXES = RULES["batch"]


def batch_shards(mesh) -> int:
    """How many ways a batch splits on `mesh` (the product of RULES['batch']'s axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


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


def entry_axes(entry) -> tuple:
    """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of them) as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(logical: tuple, shape: tuple, mesh_axes: dict) -> P:
    """PartitionSpec of an array with logical axes `logical` on a mesh of {axis: size}: each dimension takes the
    mesh axes RULES gives it that exist, have size > 1 and together divide it (otherwise it is replicated)."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match shape {shape}")
    spec = []
    for dim, name in zip(shape, logical):
        if name is not None and name not in RULES:
            raise ValueError(f"logical axis {name!r} has no entry in sharding.RULES")
        kept = tuple(a for a in RULES.get(name) or () if mesh_axes.get(a, 1) > 1)
        size = math.prod(mesh_axes[a] for a in kept)
        spec.append((kept if len(kept) > 1 else kept[0]) if kept and dim % size == 0 else None)
    used = [a for entry in spec for a in entry_axes(entry)]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {logical} put a mesh axis on two dimensions: {P(*spec)}")
    return P(*spec)


def variable_spec(path: tuple, var, mesh_axes: dict) -> P:
    """The PartitionSpec of an nnx.Variable from its `logical_axes` metadata (scalars may have none)."""
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        if getattr(value, "ndim", 0) == 0:
            return P()
        raise ValueError(f"{'.'.join(map(str, path))} {tuple(value.shape)} declares no logical axes "
                         f"(give them where it is created: layers/common.py param/linear)")
    return logical_to_spec(tuple(axes), tuple(value.shape), mesh_axes)


def shard_model(model, mesh: Mesh):
    """Places every variable of an NNX object (model, optimizer) on the mesh by its logical axes, in place."""
    mesh_axes = dict(mesh.shape)
    for path, var in nnx.state(model).flat_state():
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, variable_spec(path, var, mesh_axes))))
    return model


def shard_abstract(state, mesh: Optional[Mesh] = None):
    """An abstract nnx state (nnx.eval_shape) whose values become ShapeDtypeStructs carrying each variable's
    NamedSharding on `mesh` (its logical axes), in place: what Orbax restores into and AOT compiles over.
    mesh None: every value on this process's first device."""
    mesh_axes = dict(mesh.shape) if mesh is not None else {}
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for path, var in state.flat_state():
        value = var.get_value()
        sharding = NamedSharding(mesh, variable_spec(path, var, mesh_axes)) if mesh is not None else one
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    return state


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """Pins activation x to the mesh axes of its logical axes when a mesh is set with jax.set_mesh (the trainer
    sets its mesh around each step); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, dict(mesh.shape)))


def constrain_cache(cache: tuple) -> tuple:
    """Pins every array of per-layer inference caches (NamedTuples declaring LOGICAL_AXES, or None) to its mesh
    axes when a mesh is set: batch over data, KV heads and Mamba heads / groups over tensor. A no-op without one."""
    if jax.sharding.get_abstract_mesh().empty:
        return cache

    def one(c):
        if c is None:
            return c
        return c._replace(**{name: constrain(getattr(c, name), axes) for name, axes in c.LOGICAL_AXES.items()
                             if axes})

    return tuple(one(c) for c in cache)


def shard_abstract_cache(cache: tuple, mesh: Mesh) -> tuple:
    """Abstract per-layer caches (jax.eval_shape of init_cache) as ShapeDtypeStructs carrying the NamedShardings
    of their LOGICAL_AXES on `mesh` (scalars such as the write position replicated)."""
    mesh_axes = dict(mesh.shape)

    def one(c):
        if c is None:
            return c
        return c._replace(**{name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh, logical_to_spec(c.LOGICAL_AXES[name], x.shape, mesh_axes))) for name, x in c._asdict().items()})

    return tuple(one(c) for c in cache)


def place(x, logical: tuple, mesh: Mesh) -> jax.Array:
    """Host or device array x placed on the mesh by its logical axes."""
    return jax.device_put(x, NamedSharding(mesh, logical_to_spec(logical, np.shape(x), dict(mesh.shape))))


def parse_mesh(text: str) -> MeshConfig:
    """'data=2,tensor=2,expert=2' (the CLI's --mesh) -> MeshConfig; axes not named are 1, one may be -1."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {', '.join(AXES)}, "
                             f"got {part!r}")
        sizes[name] = int(value)
    return MeshConfig(**{a: sizes.get(a, 1) for a in AXES})


def mesh_text(sizes: dict) -> str:
    """{axis: size} -> the --mesh form parse_mesh reads ('fsdp=8,expert=8'): the axes of size > 1 in AXES
    order; '' for a single device."""
    return ",".join(f"{a}={sizes[a]}" for a in AXES if sizes.get(a, 1) > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch over data x fsdp x expert (RULES['batch'])."""
    return NamedSharding(mesh, P(BATCH_AXES, None))
