"""NemotronH parameters <-> Orbax checkpoint directories.

Layout of DIR:
    DIR/nemojax_config.json   ModelConfig.to_dict() (architecture + dtypes)
    DIR/params/               Orbax StandardCheckpointer tree of the parameters (nested dict of arrays)
    DIR/tokenizer*.json ...   tokenizer files copied from the source checkpoint, when present
    DIR/nemojax_pack.json     the PackSpec, for a 4-bit packed model (`nemojax pack`; params/ then holds the
                              packed weights)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.convert.hf import CheckpointError, load_hf, save_hf
from nemojax.fs import check_writable_target, copy_tokenizer_files, replace_directory, storage_reason
from nemojax.model import PERSISTENT, NemotronH, abstract_model, materialize
from nemojax.quant.pack import PackedWeight, PackSpec, pack_model
from nemojax.sharding import shard_abstract

CONFIG_FILE = "nemojax_config.json"
PACK_FILE = "nemojax_pack.json"
PARAMS_DIR = "params"


def save_orbax(model: NemotronH, directory: str, force: bool = False, variables=PERSISTENT,
               tokenizer_from: Optional[str] = None, pack_spec=None, extra=None) -> None:
    """Writes the model's `variables` (default: parameters and MoE bias), its config, the tokenizer files of
    `tokenizer_from` and a pack spec (packed models) as the directory `directory`, through a temporary sibling
    swapped in when complete (nemojax.fs): a failure leaves an existing directory as it was, and a non-empty one
    is replaced only with force. extra(tmp), if given, writes further files into the new directory."""
    import orbax.checkpoint as ocp

    with replace_directory(directory, force, sources=(tokenizer_from,) if tokenizer_from else ()) as tmp:
        try:
            with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:    # synchronous: errors raise here
                ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(
                    nnx.to_pure_dict(nnx.state(model, variables))))
        except (ValueError, RuntimeError, OSError) as e:                       # tensorstore reports as ValueError
            raise OSError(f"{PARAMS_DIR}/: {storage_reason(e)}") from e
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(_json_safe(model.config.to_dict()), f, indent=2)
        if pack_spec is not None:
            with open(os.path.join(tmp, PACK_FILE), "w") as f:
                json.dump(dataclasses.asdict(pack_spec), f, indent=2)
        if tokenizer_from:
            copy_tokenizer_files(tokenizer_from, tmp)
        if extra is not None:
            extra(tmp)


def read_config(directory: str) -> ModelConfig:
    """The ModelConfig saved next to an Orbax parameter tree."""
    cfg_file = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{directory} is not a nemojax Orbax checkpoint: no {CONFIG_FILE}")
    with open(cfg_file) as f:
        raw = json.load(f)
    raw["time_step_limit"] = tuple(float(v) for v in raw["time_step_limit"])
    if raw.get("ssd_impl") == "xla":          # saved before runtime options had their own section
        raw["ssd_impl"] = "chunked"
    return ModelConfig.from_dict(raw, what=cfg_file)


@jax.jit
def _all_finite(arrays: list) -> list:
    """[all elements finite] per array, as one program: one dispatch per array would put many independent
    programs with collectives in flight at once, which XLA:CPU's collectives can deadlock on a mesh."""
    return [jnp.isfinite(a).all() for a in arrays]


def restore_params(directory: str, target: dict) -> dict:
    """The saved variables as {path tuple: array} (what `materialize` takes), restored with the structure,
    shapes and dtypes of the pure-dict `target`."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            flat = _flatten(ckptr.restore(os.path.join(directory, PARAMS_DIR), target))
    except Exception as e:                             # tensorstore / Orbax errors for missing or damaged files
        raise CheckpointError(f"{directory}/{PARAMS_DIR} cannot be read ({storage_reason(e)}); the model "
                              f"directory is damaged") from e
    paths = [path for path, a in flat.items() if jnp.issubdtype(a.dtype, jnp.inexact)]
    finite = dict(zip(paths, jax.device_get(_all_finite([flat[path] for path in paths]))))
    for path, ok in finite.items():
        if not ok:
            raise CheckpointError(f"{'.'.join(map(str, path))} in {directory} holds non-finite values (NaN or "
                                  f"Inf); the model directory is damaged")
    return flat


def load_orbax(directory: str, dtype: Optional[str] = None, mesh=None) -> NemotronH:
    """Restores a model saved by save_orbax; dtype (optional) recasts parameters and compute. mesh: every
    parameter is restored straight into its shards on the mesh (its logical axes); each process reads only
    the chunks of its own devices (Orbax / tensorstore)."""
    directory = os.path.abspath(directory)
    cfg = read_config(directory)
    # explicit target shardings: without them Orbax restores onto the devices the model was saved from, which a
    # model written from a mesh (convert --mesh) names and this process may not have
    graphdef, abstract_state = abstract_model(cfg)
    abstract_state = shard_abstract(abstract_state, mesh)
    target = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, abstract_state), PERSISTENT))
    model = materialize(graphdef, abstract_state, restore_params(directory, target))
    if dtype is not None and dtype != cfg.runtime.param_dtype:
        model = cast_model(model, dtype)
    return model


def save_packed(model: NemotronH, directory: str, spec: PackSpec, force: bool = False,
                tokenizer_from: Optional[str] = None) -> None:
    """Orbax directory with the packed weights, the model config and the pack spec (load_packed reads it)."""
    save_orbax(model, directory, force, (*PERSISTENT, PackedWeight), tokenizer_from, pack_spec=spec)


def load_packed(directory: str) -> NemotronH:
    """Restores a model written by save_packed (no full-precision weights are materialised)."""
    directory = os.path.abspath(directory)
    if not os.path.isfile(os.path.join(directory, PACK_FILE)):
        raise FileNotFoundError(f"{directory} is not a packed nemojax model: no {PACK_FILE}")
    cfg = read_config(directory)
    with open(os.path.join(directory, PACK_FILE)) as f:
        spec = PackSpec(**json.load(f))

    def build():
        model = NemotronH(cfg, nnx.Rngs(0))
        pack_model(model, spec)
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    state = shard_abstract(state)                # onto this process's device, whatever the model was saved from
    target = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state), (*PERSISTENT, PackedWeight)))
    return materialize(graphdef, state, restore_params(directory, target))


def cast_model(model: NemotronH, dtype: str) -> NemotronH:
    """A copy of model with parameters and compute in `dtype` (the MoE correction bias stays fp32)."""
    cfg = model.config.replace(dtype=dtype, param_dtype=dtype)
    graphdef, state = abstract_model(cfg)
    targets = {path: v.get_value().dtype for path, v in state.flat_state()}
    values = {path: v.get_value().astype(targets[path]) for path, v in nnx.state(model, PERSISTENT).flat_state()}
    return materialize(graphdef, state, values)


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
    """Nested pure dict -> {path tuple: array}, with list indices as ints (Orbax stores them as strings)."""
    out = {}
    for key, value in tree.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def hf_to_orbax(src: str, dst: str, dtype: str = "float32", force: bool = False, dt_clamp: str = "none",
                mesh=None) -> None:
    """mesh: each tensor is read straight into its shards on the mesh's devices (host memory: one block)."""
    check_writable_target(dst, force, sources=(src,))     # before the (long) load
    save_orbax(load_hf(src, dtype=dtype, dt_clamp=dt_clamp, mesh=mesh), dst, force=force, tokenizer_from=src)


def orbax_to_hf(src: str, dst: str, dtype: Optional[str] = None, max_shard_size="5GB", force: bool = False,
                mesh=None) -> None:
    check_writable_target(dst, force, sources=(src,))
    save_hf(load_orbax(src, mesh=mesh), dst, max_shard_size=max_shard_size, dtype=dtype, force=force,
            tokenizer_from=src)


def _json_safe(d: dict) -> dict:
    out = dict(d)
    out["time_step_limit"] = [str(v) if v in (float("inf"), float("-inf")) else v for v in d["time_step_limit"]]
    return out
