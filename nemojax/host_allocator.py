"""glibc malloc settings that stop XLA:CPU from page-faulting its temporaries afresh on every step.

XLA:CPU allocates each execution's temporaries (gigabytes for a train step) with posix_memalign from its worker
threads. Those threads get their own glibc arenas, and a non-main arena serves any chunk above 64 MB with a
fresh mmap that free() unmaps again, so every step faults in and zeroes the whole buffer again. With a single
arena, no mmap and no trimming, the freed buffer stays in the heap and the next step reuses it untouched
(docs/architecture.md, "Host allocator on CPU", has the measurements).

The cost is that the process keeps its peak heap instead of returning it to the OS, which is what a training
or serving process wants. The settings only affect threads that have not allocated yet, so they must be in
place before JAX runs its first computation: `import nemojax` applies them (import it before using JAX).

Only applied when JAX will run on the CPU (JAX_PLATFORMS=cpu, or no accelerator plugin installed); set
NEMOJAX_HOST_MALLOC=0 to leave the allocator alone. Equivalent environment variables for other launchers:
MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import pathlib
import platform

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# plugin module -> whether its hardware is visible, the way JAX itself looks (PCI ids of TPU chips, device files)
_TPU_PCI_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_ACCELERATOR_MODULES = {
    "libtpu": lambda: any(pathlib.Path(v).read_text().strip() == "0x1ae0"
                          and pathlib.Path(v).with_name("device").read_text().strip() in _TPU_PCI_IDS
                          for v in glob.glob("/sys/bus/pci/devices/*/vendor")),
    **dict.fromkeys(("jax_cuda12_plugin", "jax_cuda13_plugin"),
                    lambda: any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))),
    **dict.fromkeys(("jax_rocm60_plugin", "jax_rocm7_plugin"), lambda: os.path.exists("/dev/kfd")),
}

_applied = False


def accelerator_visible() -> bool:
    """Whether an installed JAX accelerator plugin has its hardware on this host (other plugins count as
    accelerators), decided without importing JAX."""
    if any(importlib.util.find_spec(name) is not None and visible() for name, visible in _ACCELERATOR_MODULES.items()):
        return True
    return any(ep.value.split(".")[0].split(":")[0] not in _ACCELERATOR_MODULES
               for ep in importlib.metadata.entry_points(group="jax_plugins"))


def _jax_runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without initialising any backend."""
    requested = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    return requested.split(",")[0] == "cpu" if requested else not accelerator_visible()


def tune_host_allocator(force: bool = False) -> bool:
    """Applies the settings above once per process; returns whether they are in effect. `force` applies them
    whatever the backend (still not on non-glibc systems, nor with NEMOJAX_HOST_MALLOC=0)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("NEMOJAX_HOST_MALLOC", "1").strip().lower() in ("0", "false", "off", "default"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not (force or _jax_runs_on_cpu()):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt takes an int; glibc converts the trim threshold to size_t, so -1 means "never trim"
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    _applied = ok
    return ok
