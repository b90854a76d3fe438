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
import re
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from nemojax.config import LAYER_KINDS, ModelConfig
from nemojax.fs import copy_tokenizer_files, model_path, replace_directory, storage_reason
from nemojax.model import PERSISTENT, NemotronH, abstract_model, materialize
from nemojax.sharding import variable_spec

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DISK_PREFIX = "backbone."
PREFIXES = ("backbone.", "model.")
# MTP tensors in a checkpoint whose config has no MTP head are skipped with a warning (transformers drops them
# always).
MTP_PREFIX = "mtp."
FP32_TENSORS = ("e_score_correction_bias",)   # kept fp32 whatever the checkpoint dtype (as transformers does)
STACKED_EXPERT = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)(\.weight)?$")


class CheckpointError(ValueError):
    """A checkpoint's files or tensors do not match what the config describes."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of an HF tensor, stored in our parameter at `path` (at `path`[index] when our
    parameter stacks several HF tensors, e.g. experts).

    kind: 'linear'  HF [out, in]   -> ours [in, out]   (transpose)
          'conv'    HF [C, 1, K]   -> ours [K, C]
          'copy'    same layout (vectors, embeddings)
    """
    path: tuple
    start: int
    stop: int
    kind: str
    index: Optional[int] = None


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
    """Every tensor a HF NemotronH checkpoint of this config holds, with where it lives in our model.
    Names are canonical: backbone tensors without their `backbone.` prefix; `lm_head.*` and `mtp.*` as is."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [_whole("embeddings.weight", (v, d), ("embeddings", "embedding"), "copy")]
    for i, ch in enumerate(cfg.pattern):
        out += _block_layout(cfg, ch, f"layers.{i}.", ("layers", i))
    out.append(_whole("norm_f.weight", (d,), ("norm_f", "weight"), "copy"))
    if not cfg.tie_word_embeddings:
        out.append(_whole("lm_head.weight", (v, d), ("lm_head", "kernel"), "linear"))
    # MTP blocks: flat layer j = outer * len(mtp_pattern) + inner; the first layer of a block also holds
    # enorm/hnorm/eh_proj and the last one final_layernorm (Megatron-Bridge's export).
    n = len(cfg.mtp_pattern)
    for outer in range(cfg.num_nextn_predict_layers):
        ours = ("mtp", outer)
        first, last = f"mtp.layers.{outer * n}.", f"mtp.layers.{outer * n + n - 1}."
        out += [_whole(first + "enorm.weight", (d,), ours + ("enorm", "weight"), "copy"),
                _whole(first + "hnorm.weight", (d,), ours + ("hnorm", "weight"), "copy"),
                _whole(first + "eh_proj.weight", (d, 2 * d), ours + ("eh_proj", "kernel"), "linear")]
        for inner, ch in enumerate(cfg.mtp_pattern):
            out += _block_layout(cfg, ch, f"mtp.layers.{outer * n + inner}.", ours + ("layers", inner))
        out.append(_whole(last + "final_layernorm.weight", (d,), ours + ("final_layernorm", "weight"), "copy"))
    return out


def _mlp_layout(cfg: ModelConfig, pre: str, ours: tuple, width: int, d: int) -> list[HFTensor]:
    out = [_whole(pre + "up_proj.weight", (width, d), ours + ("up_proj", "kernel"), "linear"),
           _whole(pre + "down_proj.weight", (d, width), ours + ("down_proj", "kernel"), "linear")]
    if cfg.mlp_bias:
        out += [_whole(pre + "up_proj.bias", (width,), ours + ("up_proj", "bias"), "copy"),
                _whole(pre + "down_proj.bias", (d,), ours + ("down_proj", "bias"), "copy")]
    return out


def _attention_layout(cfg: ModelConfig, pre: str, mix: tuple) -> list[HFTensor]:
    d, hd = cfg.hidden_size, cfg.head_dim
    out = [_whole(f"{pre}{proj}.weight", (rows * hd, d), mix + (proj, "kernel"), "linear") for proj, rows in
           (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads),
            ("v_proj", cfg.num_key_value_heads))]
    return out + [_whole(pre + "o_proj.weight", (d, cfg.num_attention_heads * hd), mix + ("o_proj", "kernel"),
                         "linear")]


def _block_layout(cfg: ModelConfig, ch: str, pre: str, ours: tuple) -> list[HFTensor]:
    if ch not in MIXER_LAYOUTS:
        raise CheckpointError(f"layer kind {LAYER_KINDS[ch].name!r} ({ch!r}) has no HF checkpoint layout")
    norm = _whole(pre + "norm.weight", (cfg.hidden_size,), ours + ("norm", "weight"), "copy")
    return [norm] + MIXER_LAYOUTS[ch](cfg, pre + "mixer.", ours + ("mixer",))


def _moe_layout(cfg: ModelConfig, pre: str, mix: tuple) -> list[HFTensor]:
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    width = cfg.moe_latent_size or d
    out = [_whole(pre + "gate.weight", (e, d), mix + ("gate",), "linear"),
           _whole(pre + "gate.e_score_correction_bias", (e,), mix + ("e_score_correction_bias",), "copy")]
    for x in range(e):
        out.append(HFTensor(f"{pre}experts.{x}.up_proj.weight", (i, width),
                            (Piece(mix + ("up_proj",), 0, i, "linear", index=x),)))
        out.append(HFTensor(f"{pre}experts.{x}.down_proj.weight", (width, i),
                            (Piece(mix + ("down_proj",), 0, width, "linear", index=x),)))
    out += _mlp_layout(cfg, pre + "shared_experts.", mix + ("shared_experts",),
                       cfg.moe_shared_expert_intermediate_size, d)
    if cfg.moe_latent_size:
        out += [_whole(pre + "fc1_latent_proj.weight", (width, d), mix + ("fc1_latent_proj", "kernel"), "linear"),
                _whole(pre + "fc2_latent_proj.weight", (d, width), mix + ("fc2_latent_proj", "kernel"), "linear")]
        if cfg.mlp_bias:
            out += [_whole(pre + "fc1_latent_proj.bias", (width,), mix + ("fc1_latent_proj", "bias"), "copy"),
                    _whole(pre + "fc2_latent_proj.bias", (d,), mix + ("fc2_latent_proj", "bias"), "copy")]
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


# The HF tensors of each layer kind's mixer (config.LAYER_KINDS), under prefix `pre`, at our path `mix`.
MIXER_LAYOUTS = {
    "M": _mamba_layout,
    "*": _attention_layout,
    "-": lambda cfg, pre, mix: _mlp_layout(cfg, pre, mix, cfg.intermediate_size, cfg.hidden_size),
    "E": _moe_layout,
}


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


def _scan_headers(files: list[str]) -> dict[str, tuple]:
    """canonical name -> (file, name in file, shape, index), from the headers only. A stacked expert tensor
    (transformers' in-memory `experts.up_proj` [E, out, in]) stands for its E per-expert tensors, each read
    as one slice (index) of it."""
    found: dict[str, tuple] = {}

    def add(canon, entry):
        if canon in found:
            raise CheckpointError(f"tensor {canon!r} appears twice ({found[canon][0]} and {entry[0]})")
        found[canon] = entry

    for path in files:
        with _open(path) as f:
            for key in f.keys():
                canon = _canonical(key)
                shape = tuple(f.get_slice(key).get_shape())
                stacked = STACKED_EXPERT.match(canon)
                if stacked and len(shape) == 3:
                    for e in range(shape[0]):
                        add(f"{stacked.group(1)}.{e}.{stacked.group(2)}.weight", (path, key, shape[1:], e))
                else:
                    add(canon, (path, key, shape, None))
    return found


def check_checkpoint(layout: list[HFTensor], found: dict[str, tuple], directory: str, has_mtp: bool) -> None:
    expected = {t.name: t for t in layout}
    ignorable = () if has_mtp else (MTP_PREFIX,)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not (ignorable and n.startswith(ignorable)))
    wrong = sorted(f"{n}: checkpoint {found[n][2]} vs expected {expected[n].shape}"
                   for n in set(expected) & set(found) if found[n][2] != expected[n].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_abbreviate(unexpected)}")
    if wrong:
        problems.append(f"tensors with the wrong shape ({len(wrong)}): {_abbreviate(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config:\n  " + "\n  ".join(problems))
    ignored = sorted(n for n in found if ignorable and n.startswith(ignorable))
    if ignored:
        logger.warning("skipping %d MTP tensors: the config has num_nextn_predict_layers = 0", len(ignored))


def _abbreviate(names: list[str], limit: int = 40) -> str:
    return str(names) if len(names) <= limit else f"{names[:limit]} ... and {len(names) - limit} more"


def load_hf(directory: str, dtype: str = "float32", dt_clamp: str = "none", mesh=None, stats: Optional[dict] = None,
            **config_overrides) -> NemotronH:
    """Loads an HF NemotronH checkpoint directory (config.json + safetensors) into a NemotronH model.

    dtype sets both parameter and compute dtype ('float32' or 'bfloat16'); SSM math stays in fp32.
    dt_clamp='none' (the default) is NVIDIA's reference behaviour, which transformers >= 5.25 also follows;
    'hf' reproduces transformers 5.0-5.24, which floored dt at time_step_min.
    mesh: place every parameter on the mesh by its logical axes; each process reads only the safetensors byte
    ranges of the shards its devices hold (multi-host: every process calls load_hf). stats (a dict) receives
    bytes_read by this process and checkpoint_bytes. directory may be a Hub id (`org/name`) in the local
    Hugging Face cache (offline; fs.model_path).
    """
    directory = model_path(directory)
    cfg = ModelConfig.from_hf(directory, dt_clamp=dt_clamp, dtype=dtype, param_dtype=dtype, **config_overrides)
    files = _checkpoint_files(directory)
    found = _scan_headers(files)
    if cfg.num_nextn_predict_layers and not any(n.startswith(MTP_PREFIX) for n in found):
        logger.warning("%s: config.json declares %d MTP layers but the checkpoint has no mtp.* tensors (transformers "
                       "drops them when re-saving); loading without the MTP head", directory,
                       cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    layout = hf_layout(cfg)
    check_checkpoint(layout, found, directory, has_mtp=cfg.num_nextn_predict_layers > 0)

    graphdef, abstract_state = abstract_model(cfg)
    values = _read_params(layout, found, abstract_state, mesh, stats)
    if stats is not None:
        stats["checkpoint_bytes"] = sum(os.path.getsize(f) for f in files)
    return materialize(graphdef, abstract_state, values)


def _hf_index(piece: Piece, ours: tuple) -> tuple:
    """The HF tensor's index that holds ours[ours] (slices of our parameter without the expert axis) for a piece."""
    if piece.kind == "linear":          # ours = hf[start:stop].T
        rows, cols = ours
        return (slice(piece.start + cols.start, piece.start + cols.stop), rows)
    if piece.kind == "conv":            # ours [K, C] = hf[start:stop, 0, :].T
        k, c = ours
        return (slice(piece.start + c.start, piece.start + c.stop), slice(0, 1), k)
    first, *rest = ours                 # copy
    return (slice(piece.start + first.start, piece.start + first.stop), *rest)


def _from_hf_block(block: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return block.T
    if kind == "conv":
        return block[:, 0, :].T
    return block


def _read_params(layout: list[HFTensor], found: dict, abstract_state, mesh, stats: Optional[dict]) -> dict:
    """{our parameter path: jax.Array} placed by each parameter's sharding on `mesh` (its logical axes) or on
    the default device, each shard read straight from the safetensors byte ranges it needs (safetensors
    slicing): a process reads only the blocks its own devices hold, once per distinct block."""
    sources: dict[tuple, list] = {}                 # our path -> [(HF tensor, piece)], experts in index order
    for t in layout:
        for piece in t.pieces:
            sources.setdefault(piece.path, []).append((t, piece))
    handles: dict[str, object] = {}
    counted = {"bytes_read": 0}

    def read(t: HFTensor, piece: Piece, ours: tuple) -> np.ndarray:
        path, key, _, expert = found[t.name]
        if path not in handles:
            handles[path] = _open(path).__enter__()
        index = _hf_index(piece, ours)
        try:
            sliced = handles[path].get_slice(key)
            block = sliced[index] if expert is None else sliced[(slice(expert, expert + 1), *index)][0]
        except Exception as e:      # safetensors raises its own error type for bad data regions
            raise CheckpointError(f"corrupt safetensors file {path}: cannot read {t.name}: {e}") from e
        counted["bytes_read"] += block.nbytes
        if block.dtype.kind not in "iub" and not np.isfinite(block).all():          # every float, bf16 too
            raise CheckpointError(f"{t.name} in {path} holds {np.count_nonzero(~np.isfinite(block))} non-finite "
                                  f"values (NaN or Inf); the checkpoint is damaged")
        return _from_hf_block(block, piece.kind)

    axes = dict(mesh.shape) if mesh is not None else {}
    values = {}
    try:
        # parameters in the order of their files, each file closed after its last reader: a mapped file's read
        # pages count toward the process's memory while it is open
        params = sorted(((path, var) for path, var in abstract_state.flat_state() if path in sources),
                        key=lambda pv: min(found[t.name][0] for t, _ in sources[pv[0]]))
        last_reader = {found[t.name][0]: path for path, _ in params for t, _ in sources[path]}
        for path, var in params:
            target = var.get_value()
            shape = tuple(target.shape)
            parts = sources[path]
            done: dict[tuple, np.ndarray] = {}

            def block(index, parts=parts, shape=shape, dtype=target.dtype, done=done):
                ours = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
                key = tuple((s.start, s.stop) for s in ours)
                if key not in done:          # replicated blocks: read once per process
                    if parts[0][1].index is None:     # one copy: transposed, cast and contiguous at once
                        out = np.ascontiguousarray(read(*parts[0], ours), dtype=dtype)
                    else:                    # stacked experts: ours[e] comes from expert e's tensor
                        out = np.stack([read(*parts[e], ours[1:]) for e in range(*key[0])]).astype(dtype, copy=False)
                    done[key] = out
                return done[key]

            if mesh is None:        # one block, on the default device (uncommitted, as jnp.asarray places it)
                values[path] = jnp.asarray(block(tuple(slice(0, n) for n in shape)))
            else:
                values[path] = jax.make_array_from_callback(
                    shape, NamedSharding(mesh, variable_spec(path, var, axes)), block)
            for file in [f for f, reader in last_reader.items() if reader == path and f in handles]:
                handles.pop(file).__exit__(None, None, None)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    if stats is not None:
        stats["bytes_read"] = counted["bytes_read"]
    return values


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


def save_hf(model: NemotronH, directory: str, max_shard_size="5GB", dtype: Optional[str] = None,
            expert_layout: str = "per_expert", force: bool = False, tokenizer_from: Optional[str] = None) -> None:
    """Writes config.json + safetensors (sharded with an index past max_shard_size) in NVIDIA's on-disk
    names, loadable by transformers.NemotronHForCausalLM.from_pretrained, with the tokenizer files of
    `tokenizer_from`. The directory is written as a whole into a temporary sibling swapped in when complete
    (nemojax.fs): a failure leaves an existing directory as it was, and a non-empty one is replaced only with
    force. Shards are written one at a time.

    expert_layout: 'per_expert' (on-disk `experts.{e}.up_proj.weight`, what NVIDIA publishes) or 'stacked'
    (transformers' in-memory `experts.up_proj` [E, out, in])."""

    if expert_layout not in ("per_expert", "stacked"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'stacked', got {expert_layout!r}")
    cfg: ModelConfig = model.config
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    params = {path: v for path, v in nnx.state(model, PERSISTENT).flat_state()}
    layout = hf_layout(cfg)
    if expert_layout == "stacked":
        layout = _stack_experts(layout)
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
    with replace_directory(directory, force, sources=(tokenizer_from,) if tokenizer_from else ()) as tmp:
        _write_shards(tmp, params, layout, shards, out_dtype)
        cfg.replace(param_dtype=str(out_dtype)).save_hf_config(tmp)
        copied = copy_tokenizer_files(tokenizer_from, tmp) if tokenizer_from else []
        if "generation_config.json" not in copied:        # transformers' generate reads its stop tokens here
            write_generation_config(cfg, tmp)


def write_generation_config(cfg: ModelConfig, directory: str) -> None:
    """DIRECTORY/generation_config.json from the model config's special tokens, as transformers derives one
    (`_from_model_config`): bos, eos (every stop token) and pad."""
    eos = list(cfg.stop_token_ids)
    out = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id}
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in out.items() if v is not None}, f, indent=2)


def _write_shards(directory: str, params: dict, layout: list, shards: list, out_dtype) -> None:
    from safetensors.numpy import save_file

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, tensors in zip(names, shards):
        arrays = {}
        for t in tensors:
            parts = [_to_hf(_piece_value(params, p), p.kind) for p in t.pieces]
            if getattr(t, "stacked", False):
                arr = np.stack(parts, axis=0)
            else:
                arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            key = t.name if t.name.startswith(("lm_head.", MTP_PREFIX)) else DISK_PREFIX + t.name
            dtype_t = np.float32 if t.name.endswith(FP32_TENSORS) else out_dtype
            arrays[key] = np.ascontiguousarray(arr.astype(dtype_t))
            weight_map[key] = fname
        try:
            save_file(arrays, os.path.join(directory, fname), metadata={"format": "pt"})
        except Exception as e:                       # safetensors' own error type, e.g. for a full disk
            raise OSError(f"{fname}: {storage_reason(e)}") from e
        del arrays
    if len(shards) > 1:
        total = sum(int(np.prod(t.shape)) * out_dtype.itemsize for t in layout)
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _piece_value(params: dict, piece: Piece) -> np.ndarray:
    value = np.asarray(params[piece.path].get_value())
    return value if piece.index is None else value[piece.index]


@dataclasses.dataclass(frozen=True)
class StackedTensor(HFTensor):
    stacked: bool = True


def _stack_experts(layout: list[HFTensor]) -> list[HFTensor]:
    """Replaces each layer's per-expert tensors by one stacked tensor `...experts.{up,down}_proj` [E, out, in],
    at the place of its first expert."""
    result, where = [], {}
    for t in layout:
        m = re.match(r"^(.*\.experts)\.\d+\.(up_proj|down_proj)\.weight$", t.name)
        if not m:
            result.append(t)
            continue
        name = f"{m.group(1)}.{m.group(2)}"
        if name not in where:
            where[name] = len(result)
            result.append(StackedTensor(name, (0,) + t.shape, ()))
        stack = result[where[name]]
        result[where[name]] = StackedTensor(name, (stack.shape[0] + 1,) + t.shape, stack.pieces + t.pieces)
    return result


def param_count(cfg: ModelConfig, include_mtp: bool = True) -> int:
    """Parameter count from shapes alone (no allocation), equal to the HF checkpoint's element count."""
    return sum(int(np.prod(t.shape)) for t in hf_layout(cfg) if include_mtp or not t.name.startswith(MTP_PREFIX))


def active_param_count(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """Parameters used per token: everything except the routed experts a token does not visit (each MoE layer
    runs num_experts_per_tok of n_routed_experts). Embedding and lm_head included."""
    total = param_count(cfg, include_mtp)
    per_expert = 2 * cfg.moe_intermediate_size * (cfg.moe_latent_size or cfg.hidden_size)
    moe_layers = cfg.pattern.count("E") + (cfg.mtp_pattern.count("E") * cfg.num_nextn_predict_layers
                                           if include_mtp else 0)
    return total - moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
