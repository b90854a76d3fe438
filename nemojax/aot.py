"""Ahead-of-time compile plans: one train, prefill or decode step of a model compiled for a TPU topology on this
host, with per-chip HBM against the chip's capacity, FLOPs and a roofline step time (`nemojax compile`).

libtpu (`pip install 'nemojax[tpu]'`) compiles for any TPU topology without a TPU: `jax.experimental.topologies`
gives the topology's devices, the mesh is laid over them, the step's inputs are `jax.ShapeDtypeStruct`s with the
`NamedSharding`s their logical axes give (`nnx.eval_shape`: nothing is allocated), and `jit(...).lower().compile()`
runs the real TPU compiler, SPMD partitioner included. What is reported per chip:

    memory    compiled.memory_analysis(): arguments (parameters, optimizer state, caches, tokens), outputs not
              aliased to donated arguments, temporaries (activations, gradients, collectives' buffers) and code.
              A program that does not fit is refused by the compiler itself (RESOURCE_EXHAUSTED): the plan then
              reports fits=false with the bytes the compiler names.
    FLOPs     compiled.cost_analysis()["flops"] of the partitioned program, and the model FLOPs of the step
              (6 x active matmul parameters x tokens + attention for training; 2 x ... for inference), which MFU
              is quoted against.
    time      a roofline max(FLOPs / peak, bytes accessed / HBM bandwidth) from the chip's published bf16 peak and
              bandwidth (the compiler's own `optimal_seconds` comes out negative for whole models).
              With scanned layers (runtime.scan_layers) the cost analysis counts each loop body once, so its
              FLOPs and bytes are lower bounds: the roofline then uses the model FLOPs with remat's recomputed
              forward (x 4/3 for remat=block) and no bytes term (roofline_basis says which).

Steps: train = Trainer's step (loss, backward, AdamW update, donated state) on [batch, seq_len + 1] windows;
prefill = generate's prefill of a [batch, seq_len] prompt into a cache of seq_len positions (chunked by
prefill_chunk, as generation runs it); decode = one generated token per row against a cache of seq_len positions.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from nemojax.config import ConfigError, ModelConfig
from nemojax.sharding import (
    AXES,
    MeshConfig,
    batch_shards,
    logical_to_spec,
    make_mesh,
    mesh_shape,
    shard_abstract,
    shard_abstract_cache,
)
from pallas_kernels import aot as _libtpu_env  # noqa: F401  (sets libtpu's environment for AOT compilation)

Step = Literal["train", "prefill", "decode"]
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int              # what the TPU compiler allows a program (its RESOURCE_EXHAUSTED message states it)
    bf16_flops: float           # published dense bf16 peak per chip, FLOP/s
    hbm_bandwidth: float        # published HBM bandwidth per chip, bytes/s
    cores_per_chip: int         # Cloud TPU slice names count TensorCores for v5p (v5p-128 = 64 chips), chips otherwise
    shapes: dict                # chips -> topology shape the topology API accepts


_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TORUS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

# HBM: the capacity the TPU compiler states for a single-program allocation (95.74G, 31.25G, 15.75G);
# peaks and bandwidths: Cloud TPU documentation (shared research performance.md section 4)
CHIPS = {
    "v5p": Chip("TPU v5p", int(95.74 * GiB), 459e12, 2.765e12, 2, _TORUS_3D),
    "v6e": Chip("TPU v6e", int(31.25 * GiB), 918e12, 1.64e12, 1, _TORUS_2D),
    "v5e": Chip("TPU v5e", int(15.75 * GiB), 197e12, 0.82e12, 1, _TORUS_2D),
}
# for the GPU-count equivalent of a plan (same per-device arithmetic): H100 SXM 80 GB, dense bf16, HBM3
H100 = Chip("H100 SXM", 80 * 10 ** 9, 989e12, 3.35e12, 1, {})


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str             # v5p | v6e | v5e
    shape: str                  # e.g. 4x4x4
    chips: int

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def name(self) -> str:
        """The Cloud TPU slice name (v5p-128, v6e-256)."""
        return f"{self.generation}-{self.chips * self.chip.cores_per_chip}"

    @property
    def jax_name(self) -> str:
        return f"{self.generation}:{self.shape}"


def parse_topology(text: str) -> Topology:
    """'v5p-128' (Cloud slice name: v5p counts TensorCores, v6e and v5e count chips), 'v5litepod-16', or the
    topology API's own 'v5p:4x4x4' / 'v6e:16x16'."""
    text = text.strip().lower().replace("v5litepod", "v5e")
    if ":" in text:
        gen, _, shape = text.partition(":")
        if gen in CHIPS and re.fullmatch(r"\d+(x\d+)+", shape):
            return Topology(gen, shape, math.prod(int(d) for d in shape.split("x")))
    else:
        gen, _, count = text.partition("-")
        if gen in CHIPS and count.isdigit():
            chip = CHIPS[gen]
            chips, rest = divmod(int(count), chip.cores_per_chip)
            if not rest and chips in chip.shapes:
                return Topology(gen, chip.shapes[chips], chips)
            sizes = ", ".join(f"{gen}-{n * chip.cores_per_chip}" for n in chip.shapes)
            raise ConfigError(f"--topology {text!r}: no {chip.name} slice of that size; known: {sizes}")
    raise ConfigError(f"--topology {text!r}: expected a slice name such as v5p-128 or v6e-256, or the topology "
                      f"API's v5p:4x4x4; generations: {', '.join(CHIPS)}")


def topology_devices(topology: Topology) -> list:
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name).devices)
    except Exception as e:
        raise ConfigError(f"libtpu cannot describe {topology.jax_name}: {str(e).splitlines()[0][:200]} "
                          f"(pip install 'nemojax[tpu]')") from None


def compile_mesh(devices: list, cfg: MeshConfig):
    """The mesh over a topology's devices, laid out along the physical torus (mesh_utils), Auto axis types."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    shape = mesh_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return make_mesh(cfg, devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


# ---------------------------------------------------------------------------------------------------- model FLOPs
def matmul_params(cfg: ModelConfig) -> dict:
    """Parameters each token multiplies through (MoE: the routed experts it is sent to), by kind, main model only."""
    d = cfg.hidden_size
    attn = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mamba = d * cfg.mamba_in_proj_dim + cfg.mamba_inner * d
    mlp = 2 * d * cfg.intermediate_size
    moe = 0
    if cfg.n_routed_experts:
        width = cfg.moe_latent_size or d
        moe = (cfg.num_experts_per_tok * 2 * width * cfg.moe_intermediate_size
               + 2 * d * cfg.moe_shared_expert_intermediate_size + d * cfg.n_routed_experts
               + (2 * d * width if cfg.moe_latent_size else 0))
    per_kind = {"*": attn, "M": mamba, "-": mlp, "E": moe}
    out = {k: per_kind[k] * cfg.pattern.count(k) for k in per_kind}
    out["lm_head"] = d * cfg.vocab_size
    return out


def model_flops(cfg: ModelConfig, step: Step, batch: int, seq_len: int) -> float:
    """Model FLOPs of one step of the main model (not the MTP head): 2 per multiply-add of every matmul a token
    passes through (x3 with the backward pass; prefill scores the last position only), plus causal attention
    scores and values (QK^T and PV, half the square) and the SSD's state-passing matmuls counted as in the
    Mamba-2 paper (~ 2 x 3 x heads x head_dim x state per token, chunked form)."""
    weights = sum(matmul_params(cfg).values())
    n_attn, n_mamba = cfg.pattern.count("*"), cfg.pattern.count("M")
    ssd = 6 * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size
    if step == "decode":
        attn = 4 * cfg.num_attention_heads * cfg.head_dim * seq_len                 # one query against seq_len keys
        return batch * (2 * weights + n_attn * attn + n_mamba * ssd)
    tokens = batch * seq_len
    attn = 2 * cfg.num_attention_heads * cfg.head_dim * seq_len                     # causal: seq_len / 2 keys avg
    forward = tokens * (2 * weights + n_attn * attn + n_mamba * ssd)
    if step == "prefill":                   # logits of the last position only
        return forward - (tokens - batch) * 2 * matmul_params(cfg)["lm_head"]
    return 3 * forward


# ---------------------------------------------------------------------------------------------------- programs
def _train_program(cfg: ModelConfig, mesh, batch: int, seq_len: int, precision: str):
    from nemojax.model import NemotronH
    from nemojax.quant.recipe import apply_precision
    from nemojax.train.optim import make_optimizer, schedule
    from nemojax.train.trainer import TrainConfig, make_train_step

    train_cfg = TrainConfig(precision=precision)

    def build():
        model = NemotronH(cfg, nnx.Rngs(0))
        apply_precision(model, precision, train_cfg.quant)
        return model, nnx.Optimizer(model, make_optimizer(train_cfg.optim, train_cfg.steps), wrt=nnx.Param)

    model, opt = nnx.eval_shape(build)
    graphdef, state = nnx.split((model, opt))
    state = shard_abstract(state, mesh)
    step = make_train_step(cfg, train_cfg, schedule(train_cfg.optim, train_cfg.steps), jit=False)

    def train_step(state, tokens):
        model, opt = nnx.merge(graphdef, state)
        metrics = step(model, opt, tokens)
        return nnx.state((model, opt)), metrics

    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32,
                                  sharding=NamedSharding(mesh, logical_to_spec(("batch", None), (batch, seq_len + 1),
                                                                               dict(mesh.shape))))
    out_shardings = (jax.tree.map(lambda s: s.sharding, state), None)
    return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings), (state, tokens)


def _inference_program(cfg: ModelConfig, mesh, step: Step, batch: int, seq_len: int, prefill_chunk: Optional[int]):
    from nemojax.generate import _decode_step, _prefill
    from nemojax.model import NemotronH

    model = nnx.eval_shape(lambda: NemotronH(cfg, nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(batch, seq_len)) if step == "decode" else None
    graphdef, state = nnx.split(model)
    state = shard_abstract(state, mesh)
    axes = dict(mesh.shape)
    if step == "prefill":
        chunk = prefill_chunk if prefill_chunk and seq_len > prefill_chunk else None
        if chunk and seq_len % chunk:
            raise ConfigError(f"--seq-len {seq_len} must be a multiple of --prefill-chunk {chunk} (generation pads "
                              f"prompts to one)")
        sharding = NamedSharding(mesh, logical_to_spec(("batch", None), (batch, seq_len), axes))
        ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding)
        mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=sharding)

        def prefill(state, ids, mask):
            return _prefill(graphdef, state, ids, mask, seq_len, chunk)

        return jax.jit(prefill), (state, ids, mask)
    cache = shard_abstract_cache(cache, mesh)
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32,
                                  sharding=NamedSharding(mesh, logical_to_spec(("batch",), (batch,), axes)))

    def decode(state, tokens, cache):
        return _decode_step(graphdef, state, tokens, cache)

    return jax.jit(decode, donate_argnums=2), (state, tokens, cache)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard of each array)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "sharding"))


def _argument_breakdown(step: Step, args: tuple) -> dict:
    """Per-chip bytes of the step's inputs by kind: parameters, optimizer state (train), cache (decode), before
    the compiler pads arrays to its tile layout (the plan's total uses the compiler's padded figure)."""
    if step == "train":
        state, tokens = args
        return {"parameters": per_chip_bytes(state[0]), "optimizer_state": per_chip_bytes(state[1]),
                "inputs": per_chip_bytes(tokens)}
    out = {"parameters": per_chip_bytes(args[0]), "inputs": per_chip_bytes(args[1:])}
    if step == "decode":
        out["inputs"], out["cache"] = per_chip_bytes(args[1]), per_chip_bytes(args[2])
    return out


_OOM = [re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")]
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _oom_bytes(message: str) -> Optional[tuple[int, int]]:
    """(required, available) bytes from the TPU compiler's out-of-memory error, or None."""
    for pattern in _OOM:
        m = pattern.search(message)
        if m:
            return (int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)]))
    return None


def compile_plan(cfg: ModelConfig, topology: str, mesh: MeshConfig = MeshConfig(data=1, fsdp=-1), *,
                 step: Step = "train", batch: Optional[int] = None, seq_len: Optional[int] = None,
                 remat: Optional[str] = None, precision: str = "bf16", prefill_chunk: Optional[int] = 8192,
                 scan_layers: Optional[bool] = None) -> dict:
    """Compiles one `step` of `cfg` for `topology` (e.g. 'v5p-128') on `mesh` and returns the plan (see module
    docstring). batch defaults to the data x fsdp x expert size (train) or 1; seq_len to 8192 (train) or the
    model's max_position_embeddings. remat and scan_layers override cfg.runtime's. Inference compiles with bf16
    weights."""
    topo = parse_topology(topology)
    chip = topo.chip
    if step not in ("train", "prefill", "decode"):
        raise ConfigError(f"--step must be train, prefill or decode, got {step!r}")
    runtime = dict(dtype="bfloat16", param_dtype="float32" if step == "train" else "bfloat16")
    if cfg.runtime.moe_impl == "auto":     # 'auto' resolves by the host's backend (CPU here): use the TPU choice
        runtime["moe_impl"] = "gmm"
    if remat is not None:
        runtime["remat"] = remat
    if scan_layers is not None:
        runtime["scan_layers"] = scan_layers
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, **runtime))
    devices = topology_devices(topo)
    mesh_obj = compile_mesh(devices, mesh)
    data = batch_shards(mesh_obj)
    batch = batch or (data if step == "train" else 1)
    seq_len = seq_len or (8192 if step == "train" else cfg.max_position_embeddings)
    if batch % data and (step == "train" or batch >= data):     # (inference may replicate a small batch)
        raise ConfigError(f"--batch {batch} is not divisible by the data x fsdp x expert mesh axes ({data})")
    plan = {"model_layers": cfg.num_layers, "step": step, "topology": topo.name, "topology_shape": topo.jax_name,
            "chips": topo.chips, "mesh": {a: int(s) for a, s in mesh_obj.shape.items()}, "batch": batch,
            "seq_len": seq_len, "remat": cfg.runtime.remat, "scan_layers": cfg.runtime.scan_layers,
            "precision": precision,
            "hbm_capacity_bytes": chip.hbm_bytes}
    start = time.perf_counter()
    with jax.set_mesh(mesh_obj):
        if step == "train":
            fn, args = _train_program(cfg, mesh_obj, batch, seq_len, precision)
        else:
            if precision != "bf16":
                raise ConfigError("inference plans compile bf16 weights; --precision applies to --step train")
            fn, args = _inference_program(cfg, mesh_obj, step, batch, seq_len, prefill_chunk)
        breakdown = _argument_breakdown(step, args)
        lowered = fn.lower(*args)
        plan["lower_seconds"] = round(time.perf_counter() - start, 1)
        try:
            compiled = lowered.compile()
        except Exception as e:          # the compiler refusing an over-large program is a result: it does not fit
            oom = _oom_bytes(str(e))
            if oom is None or "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, required = None, oom[0]
    plan["compile_seconds"] = round(time.perf_counter() - start, 1)
    tokens = batch * (1 if step == "decode" else seq_len)
    flops_model = model_flops(cfg, step, batch, seq_len) / topo.chips
    plan["model_flops_per_chip"] = flops_model
    if compiled is None:
        # the compiler names the total it needed (its "temporaries" figure includes the arguments and outputs)
        # and stops before costing the program
        breakdown["temporaries_and_outputs"] = max(0, required - sum(breakdown.values()))
        plan.update(fits=False, hbm_bytes_per_chip=required, hbm=breakdown, flops_per_step=None,
                    roofline_step_seconds=None, tokens_per_second=None, mfu=None)
        return plan
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    args_bytes = int(mem.argument_size_in_bytes)
    out_bytes = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
    total = args_bytes + out_bytes + int(mem.temp_size_in_bytes) + int(mem.generated_code_size_in_bytes)
    breakdown.update(outputs=out_bytes, temporaries=int(mem.temp_size_in_bytes),
                     code=int(mem.generated_code_size_in_bytes))
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    if cfg.runtime.scan_layers and step == "train":
        hardware = flops_model * (4 / 3 if cfg.runtime.remat == "block" else 1)
        roofline, plan["roofline_basis"] = hardware / chip.bf16_flops, "model FLOPs (scanned: cost analysis partial)"
    else:
        roofline = max(max(flops, flops_model) / chip.bf16_flops, accessed / chip.hbm_bandwidth)
        plan["roofline_basis"] = "compiler cost analysis"
    plan.update(fits=total <= chip.hbm_bytes, hbm_bytes_per_chip=total, hbm=breakdown,
                compiler_argument_bytes=args_bytes, flops_per_step=flops, bytes_accessed=accessed,
                roofline_step_seconds=roofline, tokens_per_second=tokens / roofline,
                mfu=flops_model / (roofline * chip.bf16_flops))
    return plan
