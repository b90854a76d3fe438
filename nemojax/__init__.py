"""nemojax: NVIDIA's hybrid Mamba-Transformer (Nemotron-H family) language models in JAX / Flax NNX."""

from nemojax.config import ConfigError, ModelConfig
from nemojax.convert.hf import CheckpointError, load_hf, param_count, save_hf
from nemojax.convert.orbax import load_orbax, save_orbax
from nemojax.model import NemotronH, count_params, make_forward

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ConfigError", "CheckpointError", "NemotronH", "load_hf", "save_hf", "load_orbax",
           "save_orbax", "param_count", "count_params", "make_forward"]
