"""nemojax: NVIDIA's hybrid Mamba-Transformer (Nemotron-H family) language models in JAX / Flax NNX."""

from nemojax.host_allocator import tune_host_allocator

# On the CPU backend, before JAX's first computation starts its threads: keeps XLA's per-step temporaries in
# the heap instead of page-faulting gigabytes afresh every step (host_allocator.py). No-op with an accelerator
# plugin installed or NEMOJAX_HOST_MALLOC=0.
tune_host_allocator()

from nemojax.config import ConfigError, ModelConfig, RuntimeOptions  # noqa: E402
from nemojax.convert.hf import CheckpointError, load_hf, param_count, save_hf  # noqa: E402
from nemojax.convert.orbax import load_orbax, save_orbax  # noqa: E402
from nemojax.model import NemotronH, count_params, make_forward  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ModelConfig", "RuntimeOptions", "ConfigError", "CheckpointError", "NemotronH", "load_hf", "save_hf",
           "load_orbax", "save_orbax", "param_count", "count_params", "make_forward", "tune_host_allocator"]
