"""Load a model from either checkpoint kind by looking at what the directory holds."""

from __future__ import annotations

import os
from typing import Optional

from nemojax.config import ModelConfig
from nemojax.convert.hf import load_hf
from nemojax.convert.orbax import CONFIG_FILE, PACK_FILE, load_orbax, load_packed, read_config
from nemojax.fs import model_path


def load_model(path: str, dtype: Optional[str] = None, mesh=None):
    """An HF checkpoint directory (config.json + safetensors), a nemojax Orbax directory or a packed 4-bit
    directory (`nemojax pack`) -> NemotronH. mesh: parameters are read straight into their shards on it (HF and
    Orbax; a packed model is loaded whole and placed afterwards). path may be a Hub id in the local Hugging Face
    cache (fs.model_path)."""
    path = model_path(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} {'is not a directory' if os.path.exists(path) else 'does not exist'}: "
                                f"expected an HF checkpoint or a nemojax model directory")
    if os.path.isfile(os.path.join(path, PACK_FILE)):
        if dtype is not None:
            raise ValueError(f"{path} holds a packed 4-bit model; it cannot be recast to {dtype}")
        return load_packed(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return load_orbax(path, dtype=dtype, mesh=mesh)
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_hf(path, dtype=dtype or "float32", mesh=mesh)
    raise FileNotFoundError(f"{path} is neither an HF checkpoint (config.json) nor a nemojax Orbax checkpoint")


def model_config(path: str) -> ModelConfig:
    """The config of a model directory (HF or nemojax), without reading its weights."""
    path = model_path(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return read_config(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelConfig.from_hf(path)
    raise FileNotFoundError(f"{path} is neither an HF checkpoint (config.json) nor a nemojax Orbax checkpoint")
