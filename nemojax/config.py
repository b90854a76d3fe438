"""ModelConfig (the architecture, plus `runtime`: how to execute it), the pattern-character table, HF config.json
I/O, and the one parser of config mappings: YAML run configs, dotted key=value overrides and saved configs all go
through `build`, which reports unknown keys with the closest field name and converts typed values.

LAYER_KINDS is the one table a layer kind is declared in: its pattern character, HF layer type names and mixer
class (layers/block.py builds it; every mixer has the interface described in layers/common.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import typing
from typing import Any, Literal, Mapping, Optional, Union

import jax.numpy as jnp
import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is unknown, missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class LayerKind:
    name: str               # for messages and profile scopes
    hf_types: tuple         # HF `layers_block_type` names; the first one is written
    mixer: str              # "module:Class" of the mixer


LAYER_KINDS = {
    "M": LayerKind("Mamba-2", ("linear_attention", "mamba"), "nemojax.layers.mamba2:Mamba2Mixer"),
    "*": LayerKind("attention", ("full_attention", "attention"), "nemojax.layers.attention:Attention"),
    "-": LayerKind("MLP", ("mlp",), "nemojax.layers.mlp:MLP"),
    "E": LayerKind("MoE", ("moe",), "nemojax.layers.moe:MoE"),
}
HF_TYPE_TO_CHAR = {t: c for c, kind in LAYER_KINDS.items() for t in kind.hf_types}
STABILITY_FIELDS = ("attn_qk_norm", "attn_qkv_norm", "attn_softcap")


def validate_pattern(pattern: str, what: str = "pattern") -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{what} must be a non-empty string of the characters {''.join(LAYER_KINDS)}, "
                          f"got {pattern!r}")
    for i, ch in enumerate(pattern):
        if ch not in LAYER_KINDS:
            allowed = ", ".join(f"{c!r} ({k.name})" for c, k in LAYER_KINDS.items())
            raise ConfigError(f"{what} {pattern!r} has unknown layer character {ch!r} at position {i}; "
                              f"allowed: {allowed}")
    return pattern


def pattern_from_layer_types(types: list[str], what: str = "layers_block_type") -> str:
    if not isinstance(types, (list, tuple)) or not types:
        raise ConfigError(f"{what} must be a non-empty list of layer types, got {types!r}")
    unknown = sorted({t for t in types if t not in HF_TYPE_TO_CHAR})
    if unknown:
        raise ConfigError(f"{what} has unknown layer types {unknown}; allowed: {sorted(HF_TYPE_TO_CHAR)}")
    return "".join(HF_TYPE_TO_CHAR[t] for t in types)


def check_bounds(obj, section: str, low, *names, strict: bool = False, high=None) -> None:
    """Raises for a field of `obj` below `low` (at or below with strict) or at or above `high`."""
    for name in names:
        value = getattr(obj, name)
        if not value >= low or (strict and value == low) or (high is not None and not value < high):   # NaN too
            bound = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise ConfigError(f"{section}.{name} must be {bound}, got {value!r}")


def check_choices(obj, section: str) -> None:
    """Raises for a Literal-typed field of the dataclass `obj` holding a value outside its choices."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name, None)
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            raise ConfigError(f"{section}.{name} must be one of {typing.get_args(hint)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model is executed: dtypes, implementations and conventions. None of it changes the checkpoint layout.
    The implementations compute the same function up to rounding, except that moe_capacity_factor may drop
    expert assignments and dt_clamp may add the floor on small dt that transformers 5.0-5.24 applied."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"        # compute dtype
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    chunk_size: int = 128                                               # SSD chunk (HF config.json's chunk_size)
    ssd_impl: Literal["chunked", "naive", "associative", "pallas"] = "chunked"   # see nemojax/ssd
    moe_impl: Literal["auto", "ragged", "gmm", "capacity", "dense"] = "auto"   # see layers/moe.py
    moe_capacity_factor: Optional[float] = None  # 'capacity' slots per expert = cf * tokens * k / E; None: dropless
    moe_aux_loss_coef: float = 0.0               # Switch-style balance loss; 0 = aux-loss-free (bias updates)
    mtp_depth: int = 1                           # prediction depths trained/drafted by the MTP head
    remat: Literal["none", "block", "dots"] = "none"    # activation recomputation per block in training
    # TRAIN forward: repeated units of the layer pattern as one lax.scan each (layers/block.py scan_plan);
    # compile time then follows the number of distinct units instead of depth. Same parameters and function.
    scan_layers: bool = False
    # "none": dt only limited by time_step_limit, as NVIDIA's reference (mamba_ssm, Megatron, vLLM) and
    # transformers >= 5.25 do. "hf": transformers 5.0-5.24, which also floored dt at time_step_min on its
    # chunked path (here TRAIN, PREFILL, EXTEND forwards; not DECODE or speculative VERIFY).
    dt_clamp: Literal["none", "hf"] = "none"

    def __post_init__(self):
        check_choices(self, "model.runtime")
        if self.chunk_size < 1 or self.mtp_depth < 1:
            raise ConfigError(f"chunk_size and mtp_depth must be >= 1, got {self.chunk_size} and {self.mtp_depth}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ConfigError(f"moe_capacity_factor must be positive or None, got {self.moe_capacity_factor}")


RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(RuntimeOptions))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Nemotron-H family model. Field names follow HF `NemotronHConfig` where one exists."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    pattern: str = "M-M*-"
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    # dense MLP
    intermediate_size: int = 21504
    mlp_bias: bool = False
    mlp_hidden_act: Literal["relu2"] = "relu2"
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_hidden_act: Literal["silu"] = "silu"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # MoE (E layers)
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    moe_latent_size: Optional[int] = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_pattern: str = "*E"
    # shared
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    residual_in_fp32: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = 0
    # training-stability options (quant_training.md §4; they change the architecture, so HF checkpoints,
    # which have none of them, cannot hold a model that uses them)
    attn_qk_norm: bool = False                   # RMSNorm over head_dim on Q and K before the scores
    attn_qkv_norm: bool = False                  # RMSNorm on Q, K and V after the projection; no pre-norm
    attn_softcap: float = 0.0                    # scores <- c * tanh(scores / c) when c > 0 (e.g. 50)
    runtime: RuntimeOptions = RuntimeOptions()

    def __post_init__(self):
        try:                                      # YAML 1.1 reads [0, 1e-1] as [0, "1e-1"]
            if isinstance(self.time_step_limit, str):
                raise TypeError
            object.__setattr__(self, "time_step_limit", tuple(float(v) for v in self.time_step_limit))
        except (TypeError, ValueError):
            raise ConfigError(f"time_step_limit must be two numbers (min, max), got {self.time_step_limit!r}") from None
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_inner(self) -> int:
        """I = H * P (HF ignores `expand`)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return 2 * self.mamba_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.runtime.dtype)

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.runtime.param_dtype)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        validate_pattern(self.pattern)
        check_bounds(self, "model", 0.0, "layer_norm_epsilon", "time_step_min", "max_position_embeddings",
                     "routed_scaling_factor", strict=True)
        check_bounds(self, "model", 0.0, "initializer_range", "time_step_floor", "intermediate_size",
                     "moe_intermediate_size", "moe_shared_expert_intermediate_size", "attn_softcap")
        if self.time_step_max < self.time_step_min:
            raise ConfigError(f"time_step_max ({self.time_step_max}) must be >= time_step_min ({self.time_step_min})")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if "*" in self.pattern and self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if "M" in self.pattern and self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by "
                              f"n_groups ({self.n_groups})")
        if "-" in self.pattern and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size must be positive for '-' layers, got {self.intermediate_size}")
        check_choices(self, "model")
        if len(self.time_step_limit) != 2 or not self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ConfigError(f"time_step_limit must be (min, max) with min <= max, got {self.time_step_limit!r}")
        if not isinstance(self.runtime, RuntimeOptions):
            raise ConfigError(f"runtime must be RuntimeOptions, got {type(self.runtime).__name__}")
        if "E" in self.pattern or (self.num_nextn_predict_layers and "E" in self.mtp_pattern):
            self._validate_moe()
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.num_nextn_predict_layers:
            validate_pattern(self.mtp_pattern, "mtp_pattern")

    def _validate_moe(self) -> None:
        if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
            raise ConfigError("'E' layers need n_routed_experts > 0 and moe_intermediate_size > 0, got "
                              f"{self.n_routed_experts} and {self.moe_intermediate_size}")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                              f"[1, n_routed_experts={self.n_routed_experts}]")
        if self.moe_shared_expert_intermediate_size <= 0:
            raise ConfigError("'E' layers need moe_shared_expert_intermediate_size > 0 (one shared expert)")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by "
                              f"n_group ({self.n_group})")
        if not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")

    # ------------------------------------------------------------------ construction
    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; runtime options may be named directly (cfg.replace(remat="block"))."""
        return ModelConfig.from_dict(with_changes(self.to_dict(), changes, "ModelConfig.replace"),
                                     what="ModelConfig.replace")

    @classmethod
    def from_dict(cls, d: Mapping, what: str = "model config") -> "ModelConfig":
        """From our own field names (YAML configs, saved checkpoints). Runtime options may also be given beside
        the architecture fields (`remat: block`) instead of in a `runtime:` section."""
        return build(cls, canonical(d, what), what)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["time_step_limit"] = list(self.time_step_limit)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        return out

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "ModelConfig":
        """Reads a YAML file; takes its `model:` section when present, so run configs can embed one."""
        data = read_yaml(path)
        what = f"model config {path}"
        return cls.from_dict(with_changes(data.get("model", data) or {}, overrides, what), what=what)

    @classmethod
    def from_hf(cls, path: str, **overrides) -> "ModelConfig":
        """Reads `config.json` from an HF checkpoint directory (or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(data, **overrides)

    @classmethod
    def from_hf_dict(cls, hf: dict, dt_clamp: str = "none", **overrides) -> "ModelConfig":
        """Maps an HF NemotronHConfig dict (new or legacy keys) to ModelConfig.

        dt_clamp "none" (the default) is the reference behaviour of NVIDIA's code and of transformers >= 5.25;
        "hf" reproduces transformers 5.0-5.24, which floored dt at time_step_min. overrides: fields or runtime
        options by name, or runtime= (a mapping is merged, a RuntimeOptions replaces every runtime option). Keys
        that HF writes but the forward does not use are ignored; keys we do not recognise are logged, not fatal,
        as HF adds generic keys from release to release.
        """
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in (None, "nemotron_h"):
            raise ConfigError(f"config.json has model_type {model_type!r}; expected 'nemotron_h'")
        out: dict[str, Any] = {}
        if "use_bias" in hf:  # transformers builds the Mamba in/out projections from `use_bias`
            hf["mamba_proj_bias"] = hf.pop("use_bias")
        for legacy, new in _HF_LEGACY_KEYS.items():
            if legacy in hf:
                hf.setdefault(new, hf.pop(legacy))
        if "layers_block_type" in hf or "layer_types" in hf:
            types = hf.pop("layers_block_type", None) or hf.pop("layer_types")
            hf.pop("layer_types", None)
            out["pattern"] = pattern_from_layer_types(types)
            pattern_str = hf.pop("hybrid_override_pattern", None)
            if pattern_str is not None and validate_pattern(pattern_str, "hybrid_override_pattern") != out["pattern"]:
                raise ConfigError(f"hybrid_override_pattern {pattern_str!r} disagrees with layers_block_type "
                                  f"(pattern {out['pattern']!r})")
        elif "hybrid_override_pattern" in hf:
            out["pattern"] = validate_pattern(hf.pop("hybrid_override_pattern"), "hybrid_override_pattern")
        else:
            raise ConfigError("config.json has neither layers_block_type nor hybrid_override_pattern")
        n_layers = hf.pop("num_hidden_layers", None)
        if n_layers is not None and n_layers != len(out["pattern"]):
            raise ConfigError(f"num_hidden_layers ({n_layers}) does not match the layer pattern's length "
                              f"({len(out['pattern'])})")
        if "mtp_layers_block_type" in hf:
            types = hf.pop("mtp_layers_block_type")
            if types:
                out["mtp_pattern"] = pattern_from_layer_types(types, "mtp_layers_block_type")
        if "mtp_hybrid_override_pattern" in hf:
            out["mtp_pattern"] = validate_pattern(hf.pop("mtp_hybrid_override_pattern"), "mtp_hybrid_override_pattern")
        for key in ("moe_latent_size", "head_dim"):
            if hf.get(key) is None:
                hf.pop(key, None)
        if hf.get("num_key_value_heads") is None and "num_attention_heads" in hf:
            hf["num_key_value_heads"] = hf["num_attention_heads"]
        n_shared = hf.pop("n_shared_experts", 1)
        if n_shared not in (0, 1):
            raise ConfigError(f"n_shared_experts={n_shared} is not supported (published models use 1)")
        runtime = {"dt_clamp": dt_clamp, **({"chunk_size": hf.pop("chunk_size")} if "chunk_size" in hf else {})}
        unknown = []
        for key, value in hf.items():
            if key in _HF_FIELDS:
                out[key] = value
            elif key not in _HF_IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            logger.info("ignoring config.json keys not used by nemojax: %s", sorted(unknown))
        if out.get("time_step_limit") is not None:
            out["time_step_limit"] = tuple(_json_float(v) for v in out["time_step_limit"])
        else:
            out.pop("time_step_limit", None)
        return cls.from_dict(with_changes({**out, "runtime": runtime}, overrides, "config.json"), what="config.json")

    def to_hf_dict(self) -> dict:
        """An HF `config.json` dict that transformers' NemotronHConfig (and NVIDIA's remote config) load."""
        used = [f for f in STABILITY_FIELDS if getattr(self, f)]
        if used:
            raise ConfigError(f"{', '.join(used)} cannot be written to an HF config: transformers' NemotronH has no "
                              f"such attention option (keep this model in Orbax form)")
        d = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "layers_block_type": [LAYER_KINDS[c].hf_types[0] for c in self.pattern],
            "hybrid_override_pattern": self.pattern,
            "num_hidden_layers": self.num_layers,
            "torch_dtype": self.runtime.param_dtype,
            "chunk_size": self.runtime.chunk_size,
        }
        for name in _HF_FIELDS:
            value = getattr(self, name)
            d[name] = list(value) if isinstance(value, tuple) else value
        d["time_step_limit"] = [_float_to_json(v) for v in self.time_step_limit]
        if self.num_nextn_predict_layers:
            d["mtp_layers_block_type"] = [LAYER_KINDS[c].hf_types[0] for c in self.mtp_pattern]
        d["n_shared_experts"] = 1
        d["use_bias"] = self.mamba_proj_bias
        return d

    def save_hf_config(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True, allow_nan=True)


def canonical(d: Mapping, what: str, strict: bool = True) -> dict:
    """A model config mapping with runtime options given beside the architecture fields moved into `runtime`.
    The same option given both ways with different values is an error when strict, else the flat one wins."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {d!r}")
    d = dict(d)
    runtime = d.pop("runtime", None)
    runtime = dataclasses.asdict(runtime) if isinstance(runtime, RuntimeOptions) else runtime or {}
    if not isinstance(runtime, Mapping):
        raise ConfigError(f"{what}.runtime must be a mapping of runtime options, got {runtime!r}")
    runtime = dict(runtime)
    for key in sorted(RUNTIME_FIELDS & d.keys()):
        value = d.pop(key)
        if strict and key in runtime and runtime[key] != value:
            raise ConfigError(f"{what} gives {key} twice: {value!r} and runtime.{key} = {runtime[key]!r}")
        runtime[key] = value
    return {**d, "runtime": runtime}


def with_changes(d: Mapping, changes: Mapping, what: str) -> dict:
    """canonical(d) updated by `changes`: architecture fields, runtime options by name, and a `runtime` mapping
    (merged) or RuntimeOptions (replacing d's); options by name win over the changes' own runtime."""
    d = canonical(d, what)
    if isinstance(changes.get("runtime"), RuntimeOptions):
        d["runtime"] = {}
    changes = canonical(changes, what, strict=False)
    return {**d, **changes, "runtime": {**d["runtime"], **changes["runtime"]}}


# Architecture fields HF config.json holds under the same name.
_HF_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                   if f.name not in {"pattern", "mtp_pattern", "runtime", *STABILITY_FIELDS})

_HF_LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "attention_head_dim": "head_dim",
    "rms_norm_eps": "layer_norm_epsilon",
    "num_local_experts": "n_routed_experts",
}

# Keys HF / NVIDIA configs carry that do not change the forward pass (init-only, generation, bookkeeping).
_HF_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "num_logits_to_keep", "use_mamba_kernels", "mamba_ssm_cache_dtype", "expand", "mamba_expand",
    "attention_dropout", "hidden_dropout", "sliding_window", "output_router_logits", "moe_shared_expert_overlap",
    "attention_bias",  # transformers hard-codes bias=False for q/k/v/o whatever this says
    "rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "pruned_heads", "hidden_act", "mlp_hidden_act_fn", "kv_channels",
    "ffn_hidden_size", "mamba_dt_rank", "initializer_range_scale",
}


def _json_float(value) -> float:
    """Reads a float that transformers may have written as {"__float__": "Infinity"} or a string."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"expected a number in config.json, got {value!r}") from e


def _float_to_json(value: float):
    """Non-finite floats in transformers' own JSON encoding (plain JSON has no Infinity)."""
    return value if math.isfinite(value) else {"__float__": str(value).replace("inf", "Infinity")}


# ---------------------------------------------------------------------------------------------- parsing

def build(cls, data: Mapping, what: str):
    """cls(**data) for a config dataclass, nested dataclass fields built from nested mappings. An unknown key
    is an error naming the closest field; values of typed fields are converted (numbers given as strings:
    YAML 1.1 reads `1e-3` as one), and an unconvertible value is an error naming its dotted path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of field names to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    _check_known(data, [f.name for f in dataclasses.fields(cls)], "key", what)
    return cls(**{key: _convert(hints[key], value, f"{what}.{key}") for key, value in data.items()})


def _check_known(keys, names, kind: str, where: str) -> None:
    """Raises for the first key not in names, naming the closest one."""
    for key in keys:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(f"unknown {kind} {key!r} in {where}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _convert(hint, value, what: str):
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:          # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):               # an empty YAML section (`optim:`) means the defaults
        return value if isinstance(value, hint) else build(hint, {} if value is None else value, what)
    if hint in (int, float, bool) and not (isinstance(value, bool) and hint is bool):
        try:
            if hint is bool:
                if not isinstance(value, str) or value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            if isinstance(value, bool) or hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be {hint.__name__}, got {value!r}") from None
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (nemojax/configs/NAME.yaml): the published models and the
    tiny CPU ones."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def resolve_config(spec: str) -> str:
    """The YAML file a --config value names: an existing path as given, else a shipped config by its bare name
    (`nano_v2_12b`), with or without `.yaml`, also written as `configs/NAME.yaml` (the repository's path) from
    any directory. Anything else is one error listing the shipped configs."""
    if os.path.exists(spec):
        return spec
    head, name = os.path.split(spec)
    stem = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    if head in ("", "configs", os.path.join("nemojax", "configs")) and stem in shipped_configs():
        return os.path.join(CONFIG_DIR, f"{stem}.yaml")
    close = difflib.get_close_matches(stem, shipped_configs(), n=1)
    raise FileNotFoundError(f"no config {spec!r}: not a file, and not one of the configs shipped with nemojax "
                            f"({', '.join(shipped_configs())})" + (f"; did you mean {close[0]!r}?" if close else ""))


def read_yaml(path: str) -> dict:
    """A YAML mapping from a file or a shipped config's name (resolve_config)."""
    path = resolve_config(path)
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory, not a YAML config file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a non-empty mapping at top level, got {data!r}")
    return data


def read_run_config(path: str, overrides=(), sections=("model", "train")) -> dict:
    """{section: mapping} of a YAML run config with dotted `key=value` overrides applied (values parsed as
    YAML; a key without a section prefix belongs to the last section: `steps=10` is `train.steps=10`)."""
    raw = read_yaml(path)
    _check_known(raw, sections, "section", f"{path} (sections: {', '.join(sections)})")
    if isinstance(raw.get("model"), Mapping):    # runtime options in one place, so overrides of either form win
        raw["model"] = canonical(raw["model"], f"{path} model")
    out = {s: dict(raw.get(s) or {}) for s in sections}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] == "model" and len(parts) == 2 and parts[1] in RUNTIME_FIELDS:
            parts.insert(1, "runtime")
        node = out if parts[0] in sections else out[sections[-1]]
        for p in parts[:-1]:
            if node.get(p) is None:                        # absent, or an empty YAML section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return out
