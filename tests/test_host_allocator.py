"""nemojax.host_allocator: a freed large buffer is reused without page faults once `import nemojax` tuned
glibc malloc on the CPU backend; the opt-out and accelerator installs leave malloc alone."""

import json
import os
import subprocess
import sys

import pytest

# As XLA:CPU does with its per-execution temporaries: a worker thread allocates a large buffer, writes it,
# frees it, and again. (Plain malloc: XLA's posix_memalign settles on the same reuse after a few rounds.)
PROBE = """
import ctypes, json, resource, threading
import nemojax
from nemojax import host_allocator

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
faults = []

def use_buffer():
    ptr = libc.malloc(ctypes.c_size_t(SIZE))
    ctypes.memset(ptr, 1, SIZE)
    libc.free(ptr)

def worker():
    use_buffer()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    use_buffer(); use_buffer()
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

t = threading.Thread(target=worker); t.start(); t.join()
print(json.dumps({"applied": host_allocator._applied, "faults": faults[0]}))
"""


def _probe(**env) -> dict:
    full = {**os.environ, "JAX_PLATFORMS": "cpu", "NEMOJAX_HOST_MALLOC": "1", **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_import_tunes_malloc_so_large_buffers_are_reused():
    tuned, default = _probe(), _probe(NEMOJAX_HOST_MALLOC="0")
    assert tuned["applied"] and not default["applied"]
    # 2 x 256 MB in 4 KB pages is 131072 faults when the buffer is mapped afresh
    assert default["faults"] > 100000, default
    assert tuned["faults"] < 1000, tuned


def test_not_applied_for_accelerator_backends():
    assert not _probe(JAX_PLATFORMS="cuda")["applied"]


def test_an_installed_plugin_counts_only_with_its_hardware(monkeypatch):
    """libtpu installed on a host without TPU chips (as the test venv has it) still means a CPU run."""
    from nemojax import host_allocator

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_allocator, "_ACCELERATOR_MODULES", {"json": lambda: False})   # an importable stand-in
    assert not host_allocator.accelerator_visible() and host_allocator._jax_runs_on_cpu()
    monkeypatch.setattr(host_allocator, "_ACCELERATOR_MODULES", {"json": lambda: True})
    assert host_allocator.accelerator_visible() and not host_allocator._jax_runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_allocator._jax_runs_on_cpu()
