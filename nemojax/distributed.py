"""Multi-process start-up: `jax.distributed.initialize()` when the process is one of several (TPU pod slice,
SLURM, Open MPI, or an explicit coordinator), before anything touches a JAX backend."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax

MODES = ("auto", "on", "off")


def launched_multi_process(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when the environment says this process is one of several JAX processes."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):              # a TPU VM pod slice with several workers
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        if int(env.get(key, "1") or 1) > 1:
            return True
    return False


def initialize(mode: str = "auto", **kwargs) -> bool:
    """Starts jax.distributed for mode 'on', or for 'auto' when launched_multi_process(); returns whether it
    did. kwargs (coordinator_address, num_processes, process_id, ...) go to jax.distributed.initialize;
    without them JAX detects the cluster (TPU pods, SLURM, Open MPI)."""
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not kwargs and not launched_multi_process()):
        return False
    jax.distributed.initialize(**kwargs)
    return True
