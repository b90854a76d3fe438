import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole run: the pytest workers and every subprocess they start
# (CLI runs, mesh workers, notebooks, the README's commands) compile the same tiny programs again and again; a
# cached executable loads in milliseconds (measured: a README-sized `nemojax train` 29 s -> 12 s). The cache key
# is the program, the devices and the compiler flags, so a hit is the same executable. The first process of a
# run (the xdist controller) makes the directory; its workers and their children inherit the variable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nemojax-test-xla-cache-")
    os.environ["NEMOJAX_TEST_OWNS_XLA_CACHE"] = str(os.getpid())
# Programs that compile in over a second only (train steps, forwards, kernels): caching every eager op too made
# ~9,000 entries, and each write scans the whole directory for its size limit.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock (jax's LRUCache): without it a process can read an entry another is
# still writing (a warning, then a compile).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    """One stdlib corpus index shared by a module's training tests (documents are read lazily)."""
    from train_helpers import SMALL

    from nemojax.train.data import Corpus
    from nemojax.train.trainer import load_run_config

    return Corpus(load_run_config("configs/tiny.yaml", SMALL)[1].data)


def pytest_unconfigure(config):
    if os.environ.get("NEMOJAX_TEST_OWNS_XLA_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
