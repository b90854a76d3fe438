"""Hugging Face safetensors <-> NemotronH parameters.

On disk, HF checkpoints use NVIDIA's names (`backbone.layers.{l}.mixer...`, `lm_head.weight`); transformers
renames `backbone.` to `model.` in memory. Both prefixes are accepted when loading; saving writes `backbone.`.

Every HF tensor maps to one or more pieces of our parameters (the fused Mamba in_proj / conv1d are split,
see layers/mamba2.py). Loading first reads only the safetensors headers and checks names and shapes against
the expected layout, reporting every missing, unexpected or mis-shaped tensor at once; then it streams one
tensor at a time into the parameter arrays, so host memory holds the model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model import NemotronH

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DISK_PREFIX = "backbone."
PREFIXES = ("backbone.", "model.")
# Tensors HF itself drops on load; we do not model them yet, so we skip them with a log line.
IGNORED_PREFIXES = ("mtp.",)


class CheckpointError(ValueError):
    """A checkpoint's files or tensors do not match what the config describes."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of an HF tensor, stored in our parameter at `path`.

    kind: 'linear'  HF [out, in]   -> ours [in, out]   (transpose)
          'conv'    HF [C, 1, K]   -> ours [K, C]
          'copy'    same layout (vectors, embeddings)
    """
    path: tuple
    start: int
    stop: int
    kind: str


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str            # without the backbone./model. prefix for backbone tensors
    shape: tuple
    pieces: tuple


def _whole(name: str, shape: tuple, path: tuple, kind: str) -> HFTensor:
    return HFTensor(name, tuple(shape), (Piece(path, 0, shape[0], kind),))


def _split(name: str, shape: tuple, parts: Iterable[tuple[tuple, int]], kind: str) -> HFTensor:
    pieces, start = [], 0
    for path, rows in parts:
        pieces.append(Piece(path, start, start + rows, kind))
        start += rows
    assert start == shape[0], (name, start, shape)
    return HFTensor(name, tuple(shape), tuple(pieces))


def hf_layout(cfg: ModelConfig) -> list[HFTensor]:
    """Every tensor a HF NemotronH checkpoint of this config holds, with where it lives in our model."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [_whole("embeddings.weight", (v, d), ("embeddings", "embedding"), "copy")]
    for i, ch in enumerate(cfg.pattern):
        pre, mix = f"layers.{i}.", ("layers", i, "mixer")
        out.append(_whole(pre + "norm.weight", (d,), ("layers", i, "norm", "weight"), "copy"))
        if ch == "M":
            out += _mamba_layout(cfg, pre + "mixer.", mix)
        elif ch == "*":
            hd = cfg.head_dim
            for proj, rows in (("q_proj", cfg.num_attention_heads * hd), ("k_proj", cfg.num_key_value_heads * hd),
                               ("v_proj", cfg.num_key_value_heads * hd)):
                out.append(_whole(f"{pre}mixer.{proj}.weight", (rows, d), mix + (proj, "kernel"), "linear"))
            out.append(_whole(pre + "mixer.o_proj.weight", (d, cfg.num_attention_heads * hd),
                              mix + ("o_proj", "kernel"), "linear"))
        elif ch == "-":
            f = cfg.intermediate_size
            out.append(_whole(pre + "mixer.up_proj.weight", (f, d), mix + ("up_proj", "kernel"), "linear"))
            out.append(_whole(pre + "mixer.down_proj.weight", (d, f), mix + ("down_proj", "kernel"), "linear"))
            if cfg.mlp_bias:
                out.append(_whole(pre + "mixer.up_proj.bias", (f,), mix + ("up_proj", "bias"), "copy"))
                out.append(_whole(pre + "mixer.down_proj.bias", (d,), mix + ("down_proj", "bias"), "copy"))
        else:
            raise NotImplementedError(f"layer {i} is {ch!r}: MoE conversion is not implemented yet")
    out.append(_whole("norm_f.weight", (d,), ("norm_f", "weight"), "copy"))
    if not cfg.tie_word_embeddings:
        out.append(_whole("lm_head.weight", (v, d), ("lm_head", "kernel"), "linear"))
    return out


def _mamba_layout(cfg: ModelConfig, pre: str, mix: tuple) -> list[HFTensor]:
    d, inner, gn, h, k = cfg.hidden_size, cfg.mamba_inner, cfg.n_groups * cfg.ssm_state_size, \
        cfg.mamba_num_heads, cfg.conv_kernel
    proj_parts = [("in_proj_z", inner), ("in_proj_x", inner), ("in_proj_B", gn), ("in_proj_C", gn), ("in_proj_dt", h)]
    conv_parts = [("conv_x", inner), ("conv_B", gn), ("conv_C", gn)]
    out = [_split(pre + "in_proj.weight", (cfg.mamba_in_proj_dim, d),
                  [(mix + (p, "kernel"), r) for p, r in proj_parts], "linear"),
           _split(pre + "conv1d.weight", (cfg.mamba_conv_dim, 1, k),
                  [(mix + (p, "weight"), r) for p, r in conv_parts], "conv")]
    if cfg.use_conv_bias:
        out.append(_split(pre + "conv1d.bias", (cfg.mamba_conv_dim,),
                          [(mix + (p, "bias"), r) for p, r in conv_parts], "copy"))
    if cfg.mamba_proj_bias:
        out.append(_split(pre + "in_proj.bias", (cfg.mamba_in_proj_dim,),
                          [(mix + (p, "bias"), r) for p, r in proj_parts], "copy"))
        out.append(_whole(pre + "out_proj.bias", (d,), mix + ("out_proj", "bias"), "copy"))
    for name in ("dt_bias", "A_log", "D"):
        out.append(_whole(pre + name, (h,), mix + (name,), "copy"))
    out.append(_whole(pre + "norm.weight", (inner,), mix + ("norm", "weight"), "copy"))
    out.append(_whole(pre + "out_proj.weight", (d, inner), mix + ("out_proj", "kernel"), "linear"))
    return out


def _to_ours(hf: np.ndarray, piece: Piece) -> np.ndarray:
    part = hf[piece.start:piece.stop]
    if piece.kind == "linear":
        return part.T
    if piece.kind == "conv":
        return part[:, 0, :].T
    return part


def _to_hf(ours: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return ours.T
    if kind == "conv":
        return ours.T[:, None, :]
    return ours


def _canonical(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# ---------------------------------------------------------------------------------------------- loading

def _checkpoint_files(directory: str) -> list[str]:
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [os.path.join(directory, f) for f in files]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory} (pickled .bin checkpoints are not loaded)")
    return [os.path.join(directory, f) for f in files]


def _open(path: str):
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def _scan_headers(files: list[str]) -> dict[str, tuple[str, str, tuple]]:
    """canonical name -> (file, name in file, shape), from the headers only."""
    found: dict[str, tuple[str, str, tuple]] = {}
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                canon = _canonical(key)
                if canon in found:
                    raise CheckpointError(f"tensor {key!r} appears twice ({found[canon][0]} and {path})")
                found[canon] = (path, key, tuple(f.get_slice(key).get_shape()))
    return found


def check_checkpoint(layout: list[HFTensor], found: dict[str, tuple[str, str, tuple]], directory: str) -> None:
    expected = {t.name: t for t in layout}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not n.startswith(IGNORED_PREFIXES))
    wrong = sorted(f"{n}: checkpoint {found[n][2]} vs expected {expected[n].shape}"
                   for n in set(expected) & set(found) if found[n][2] != expected[n].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if wrong:
        problems.append(f"tensors with the wrong shape ({len(wrong)}): {wrong}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config:\n  " + "\n  ".join(problems))
    ignored = sorted(n for n in found if n.startswith(IGNORED_PREFIXES))
    if ignored:
        logger.warning("skipping %d tensors nemojax does not model yet (e.g. %s)", len(ignored), ignored[0])


def load_hf(directory: str, dtype: str = "float32", dt_clamp: str = "hf", **config_overrides) -> NemotronH:
    """Loads an HF NemotronH checkpoint directory (config.json + safetensors) into a NemotronH model.

    dtype sets both parameter and compute dtype ('float32' or 'bfloat16'); SSM math stays in fp32.
    dt_clamp='hf' reproduces transformers' logits; 'none' gives NVIDIA's reference behaviour.
    """
    cfg = ModelConfig.from_hf(directory, dt_clamp=dt_clamp, dtype=dtype, param_dtype=dtype, **config_overrides)
    layout = hf_layout(cfg)
    files = _checkpoint_files(directory)
    found = _scan_headers(files)
    check_checkpoint(layout, found, directory)

    abstract = nnx.eval_shape(lambda: NemotronH(cfg, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    targets = {path: v for path, v in abstract_state.flat_state()}
    loaded: dict[tuple, jax.Array] = {}
    by_file: dict[str, list[HFTensor]] = {}
    for t in layout:
        by_file.setdefault(found[t.name][0], []).append(t)
    for path, tensors in by_file.items():
        with _open(path) as f:
            for t in tensors:
                try:
                    hf = f.get_tensor(found[t.name][1])
                except Exception as e:  # safetensors raises its own error type for bad data regions
                    raise CheckpointError(f"corrupt safetensors file {path}: cannot read {t.name}: {e}") from e
                for piece in t.pieces:
                    target = targets[piece.path]
                    arr = np.ascontiguousarray(_to_ours(hf, piece)).astype(target.get_value().dtype)
                    loaded[piece.path] = jnp.asarray(arr)
                del hf
    for path, var in targets.items():
        var.set_value(loaded.pop(path))
    return nnx.merge(graphdef, abstract_state)


# ---------------------------------------------------------------------------------------------- saving

def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    s = str(size).strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_hf(model: NemotronH, directory: str, max_shard_size="5GB", dtype: Optional[str] = None) -> None:
    """Writes config.json + safetensors (sharded with an index past max_shard_size) in NVIDIA's on-disk
    names, loadable by transformers.NemotronHForCausalLM.from_pretrained. Shards are written one at a time
    and each file is first written under a temporary name, then renamed, so a crash leaves no half file."""
    from safetensors.numpy import save_file

    cfg: ModelConfig = model.config
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    params = {path: v for path, v in nnx.state(model, nnx.Param).flat_state()}
    layout = hf_layout(cfg)
    limit = _parse_size(max_shard_size)
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in layout:
        nbytes = int(np.prod(t.shape)) * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    os.makedirs(directory, exist_ok=True)
    cfg.replace(param_dtype=str(out_dtype)).save_hf_config(directory)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, tensors in zip(names, shards):
        arrays = {}
        for t in tensors:
            parts = [_to_hf(np.asarray(params[p.path].get_value()), p.kind) for p in t.pieces]
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            key = t.name if t.name == "lm_head.weight" else DISK_PREFIX + t.name
            arrays[key] = np.ascontiguousarray(arr.astype(out_dtype))
            weight_map[key] = fname
        tmp = os.path.join(directory, fname + ".tmp")
        save_file(arrays, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, fname))
        del arrays
    if len(shards) > 1:
        total = sum(int(np.prod(t.shape)) * out_dtype.itemsize for t in layout)
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def param_count(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (no allocation), equal to the HF checkpoint's element count."""
    return sum(int(np.prod(t.shape)) for t in hf_layout(cfg))
