"""Ahead-of-time checks of kernels for accelerators this host does not have.

    compile_for_tpu(fn, *args, topology="v5e:2x2")   the real TPU compiler (Mosaic for Pallas) through libtpu
                                                     (`pip install 'nemojax[tpu]'`), for one chip of the topology
    lower_for_tpu(fn, *args, topology=...)           the same up to lowering (Pallas's block-shape rules)
    lower_for_cuda(fn, *args)                        the CUDA lowering (Pallas -> Triton / Mosaic GPU IR), which
                                                     rejects illegal block shapes and layouts

args may be arrays or jax.ShapeDtypeStructs (pytrees of them); nothing is allocated. The compiled TPU
executable's cost_analysis() and memory_analysis() give the compiler's FLOP, byte and time estimates and the
per-chip memory. Kernels must be traced for the target explicitly (e.g. matmul4(..., target="tpu",
interpret=False)): on this host jax.default_backend() is the CPU.
"""

from __future__ import annotations

import functools
import os

import jax
from jax.sharding import SingleDeviceSharding

# libtpu takes a machine-wide lock and queries cloud metadata by default; neither applies to AOT compilation
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")     # (no TPU VM: silences libtpu's host detection)


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def tpu_device(topology: str = "v5e:2x2"):
    """The first chip of a TPU topology ('v5e:2x2', 'v6e:2x2', 'v5p:2x2x1', ...) for compilation only."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]


def _structs(args, sharding=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)


def lower_for_tpu(fn, *args, topology: str = "v5e:2x2"):
    """jax.jit(fn) lowered for one chip of `topology` (Pallas kernels become Mosaic; `.compile()` compiles)."""
    device = tpu_device(topology)
    with jax.default_device(device):
        return jax.jit(fn).lower(*_structs(args, SingleDeviceSharding(device)))


def compile_for_tpu(fn, *args, topology: str = "v5e:2x2"):
    """jax.jit(fn) compiled for one chip of `topology`: the returned executable's cost_analysis() and
    memory_analysis() report the compiler's estimates. Raises the compiler's error if the program is illegal."""
    return lower_for_tpu(fn, *args, topology=topology).compile()


def lower_for_cuda(fn, *args):
    """jax.jit(fn) lowered for CUDA (no GPU or CUDA plugin needed)."""
    return jax.jit(fn).trace(*_structs(args)).lower(lowering_platforms=("cuda",))
