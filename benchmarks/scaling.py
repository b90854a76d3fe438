"""Scaling plans for every published config: the smallest TPU v5p and v6e slice (and the H100 count) on which
(a) a train step at seq 8192 fits and (b) inference at the model's full context fits at batch 1 and 32, with
roofline tokens/s and MFU. Writes docs/scaling.md.

    python benchmarks/scaling.py [--configs nemotron_h_8b,...] [--generations v5p,v6e] [--cases train,decode1,decode32]
        [--compile] [--budget-minutes 60] [--results benchmarks/scaling_results.jsonl] [--out docs/scaling.md]

Two sources, kept apart in the table:
  plan      per-chip memory arithmetic (below): parameters, gradients and AdamW state sharded over every chip
            (FSDP), activations of a block-remat train step, KV cache and Mamba state at full context. It picks the
            smallest slice whose estimate is under 90% of the chip's HBM, and on it the smallest tensor-parallel
            size (train: 1, 2, 4, 8; with sequence parallelism a sequence's activations split over it). Instant;
            an estimate.
  compiled  `nemojax compile` (nemojax.aot.compile_plan) of that step on that slice: the TPU compiler's own
            per-chip memory, FLOPs and the roofline. --compile compiles each planned row (the planned slice and
            mesh, then the next larger tensor axis or slice while it does not fit) until --budget-minutes is
            spent; results accumulate in --results across runs, so the table fills in as more is compiled.

H100 count: the same per-device arithmetic (tensor parallelism included) with 80 GB devices (GPU rows are never
compiled here).
Train: global batch 768 x 8192 tokens (the Megatron-Bridge recipes' GBS) reached with gradient accumulation over
per-step batches of one sequence per data shard (chips / tensor, capped at 768); remat=block; AdamW fp32 state;
bf16 compute. Mesh: fsdp over the chips a tensor group does not take (MoE: fsdp x expert).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemojax.aot import CHIPS, H100, Chip, Topology, model_flops  # noqa: E402
from nemojax.config import ModelConfig  # noqa: E402
from nemojax.convert.hf import param_count  # noqa: E402
from nemojax.sharding import mesh_text  # noqa: E402

HEADROOM = 0.9                      # a plan must leave 10% of HBM for the runtime and fragmentation
TRAIN_SEQ, GLOBAL_BATCH = 8192, 768
EXPERT_PARALLEL = 8                 # MoE train steps: experts split at most 8 ways (plan_mesh)
TENSOR_PARALLEL = (1, 2, 4, 8)      # train steps: tensor-parallel sizes the plan tries, smallest first
CONTEXT = {"nemotron3_nano_30b_a3b": 1048576}      # beyond config.json's max_position_embeddings (Nemotron 3: 1M)
CASES = {"train": ("train", None), "decode1": ("decode", 1), "decode32": ("decode", 32)}


NOTES = [
    "- Compiled train rows: see the table's \"compiled\" column, with the mesh each compiled on (8B on v5p and 56B "
    "were compiled unrolled, before scan_layers; the others scanned). MoE train rows compile with expert parallelism "
    "(plan_mesh: fsdp x expert, the batch split over both) and experts through gmm. Train steps take 4-16 "
    "minutes to compile on the 2-core host (benchmarks/compile_time.md), so rows without a compiled slice are "
    "plans.",
    "- MoE train steps and expert parallelism. Nemotron 3 Super's train step with pure FSDP asked 124 GB per "
    "chip on v5p-128 and 122 GB on v5p-256 (temporaries 100-110 GB, which more chips did not shrink): every "
    "chip gathered all 512 experts' weights of a layer (bf16[512, 1024, 2688], 2.6 GB, several live copies) and "
    "their fp32 gradients (5.3 GB each). With the expert axis (layers/moe.py experts_on_mesh: each expert shard "
    "gathers its expert group's tokens and computes its own experts' assignments, one token block at a time) "
    "it fits v5p-128 on fsdp=8, expert=8: 78.7 GB per chip (temporaries 44.6 GB). Nemotron 3 Nano fits v5p-16 "
    "on fsdp=4, expert=2 (89.9 GB; with pure FSDP v5p-16 asked 103.6 GB and v5p-32 was the smallest).",
    "- Tensor and sequence parallelism (sharding.RULES['act_seq']: the residual stream's positions split over "
    "'tensor' between blocks). With FSDP alone every chip holds one whole 8192-token sequence's activations, "
    "which more chips do not shrink: 47B asked 43.2 GB per chip on v6e-256 (fsdp=256), 56B did not fit any v6e "
    "slice. With tensor=4, 47B fits v6e-64 (fsdp=16) at 25.0 GB per chip (temporaries 15.9 GB) and 56B fits "
    "v6e-64 (fsdp=16) at 33.0 GB of the 33.6 GB the compiler allows (temporaries 21.9 GB): a thin margin; "
    "tensor=8 or v6e-128 would leave more (not compiled). Nemotron 3 Super fits v6e-128 on fsdp=2, tensor=8, "
    "expert=8 at 33.0 GB per chip, again thin (temporaries 15.0 GB; parameters 5.8 GB: the non-expert weights "
    "split 16 ways only); 30 minutes to compile on the 2-core host.",
    "- Planned rows with a tensor axis on a smaller slice than the compiled FSDP row (e.g. Nano 2 12B on v6e-8 "
    "with tensor=8 against v6e-32 compiled) are not compiled yet: the compiled column is the smallest slice "
    "verified so far. The plan's arithmetic came within about 25% of the compiled per-chip bytes for the "
    "compiled dense rows (it leaves 10% headroom).",
    "- Nemotron 3 Nano on v6e: v6e-32 (fsdp=8, expert=4) asked 33.9 GB per chip against 33.6 GB; v6e-64 "
    "(fsdp=8, expert=8) fits at 27.1 GB.",
    "- MFU \"n/a\": the compiler's FLOP count of the partitioned program came out below the model FLOPs (scanned "
    "steps count a loop body once), so the roofline is the model FLOPs at peak and says nothing about utilisation.",
]


def context(name: str, cfg: ModelConfig) -> int:
    return CONTEXT.get(name, cfg.max_position_embeddings)


def estimate_bytes(cfg: ModelConfig, step: str, chips: int, batch: int, seq: int, tensor: int = 1) -> dict:
    """Per-device bytes of one step with everything sharded over `chips` devices (FSDP for weights and state,
    the batch over chips / tensor where it divides, and a sequence's train activations over `tensor`: tensor
    and sequence parallelism). Rough by design: the compiled rows are the truth."""
    n = param_count(cfg)
    # routed expert weights split over every chip; the rest over fsdp x tensor only (replicated over 'expert')
    routed = cfg.pattern.count("E") * cfg.n_routed_experts * 2 * (cfg.moe_latent_size or cfg.hidden_size) * \
        cfg.moe_intermediate_size
    per_chip = routed / chips + (n - routed) * expert_size(cfg, step, chips) / chips
    d, layers = cfg.hidden_size, cfg.num_layers
    shards = chips // tensor
    rows = batch / shards if batch >= shards else batch          # rows held per data shard
    if step == "train":
        tokens = rows * seq / tensor
        widest = max(cfg.mamba_in_proj_dim, 2 * cfg.intermediate_size,
                     2 * cfg.num_experts_per_tok * cfg.moe_intermediate_size)
        # the SSD of one Mamba layer recomputed in the backward pass: fp32 chunk states [chunks, heads, P, N] and
        # intra-chunk scores [chunks, heads, L, L], about three live copies
        chunk = cfg.runtime.chunk_size
        ssd = 12 * cfg.mamba_num_heads * (cfg.mamba_head_dim * cfg.ssm_state_size / chunk + chunk)
        return {"state": 16 * per_chip,                                    # fp32 weights, grads, Adam m and v
                "scan_stack": 2 * per_chip * cfg.runtime.scan_layers,      # bf16 stacked copy (layers/block.py)
                "activations": tokens * (2 * d * layers                    # bf16 block inputs kept by remat
                                         + 4 * widest * 2                  # one block's recompute working set
                                         + ssd * ("M" in cfg.pattern)
                                         + 2 * 4 * cfg.vocab_size)}        # fp32 logits and their gradient
    kv = 2 * cfg.pattern.count("*") * cfg.num_key_value_heads * cfg.head_dim * seq * 2
    ssm = cfg.pattern.count("M") * (cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
                                    + (cfg.conv_kernel - 1) * cfg.mamba_conv_dim * 2)
    return {"weights": 2 * n / chips, "cache": rows * (kv + ssm),
            "activations": rows * 4 * cfg.vocab_size + 64 * 2 ** 20}


def slices(chip: Chip) -> list[int]:
    return sorted(chip.shapes) if chip.shapes else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def tensor_sizes(cfg: ModelConfig, step: str, chips: int) -> list[int]:
    """Tensor-parallel sizes a row may use on `chips`: train steps try TENSOR_PARALLEL where the size divides
    the chips left after the expert axis and the widths that hold the memory (attention and Mamba heads, MLP
    and expert widths, vocabulary); inference rows keep FSDP. Narrower tensor-sharded axes (KV heads, SSM
    groups) are replicated where the size does not divide them (sharding.logical_to_spec)."""
    if step != "train":
        return [1]
    widths = [cfg.num_attention_heads, cfg.mamba_num_heads, cfg.intermediate_size, cfg.vocab_size] + (
        [cfg.moe_intermediate_size] if cfg.n_routed_experts else [])
    return [t for t in TENSOR_PARALLEL if chips % (t * expert_size(cfg, step, chips)) == 0
            and all(w % t == 0 for w in widths if w)]


def row_batch(case: str, chips: int, tensor: int) -> int:
    """Sequences per step: for training one per data shard (a tensor group), at most the global batch; the
    case's own batch for decode."""
    step, batch = CASES[case]
    return min(chips // tensor, GLOBAL_BATCH) if step == "train" else batch


def planned(cfg: ModelConfig, case: str, chip: Chip, chips: int, tensor: int, seq: int) -> Optional[dict]:
    """The plan of one (slice, tensor size), or None where its estimate is over HEADROOM of the chip's HBM."""
    step, b = CASES[case][0], row_batch(case, chips, tensor)
    parts = estimate_bytes(cfg, step, chips, b, seq, tensor)
    if sum(parts.values()) > HEADROOM * chip.hbm_bytes:
        return None
    return {"chips": chips, "tensor": tensor, "batch": b, "seq_len": seq,
            "estimate_bytes": int(sum(parts.values())), "estimate": {k: int(v) for k, v in parts.items()}}


def plan_row(name: str, cfg: ModelConfig, case: str, chip: Chip) -> dict:
    step, batch = CASES[case]
    seq = TRAIN_SEQ if step == "train" else context(name, cfg)
    for chips in slices(chip):
        for tensor in tensor_sizes(cfg, step, chips):
            plan = planned(cfg, case, chip, chips, tensor, seq)
            if plan:
                return plan
    return {"chips": None, "tensor": 1, "batch": batch, "seq_len": seq}


def slice_name(generation: str, chips: int) -> str:
    return Topology(generation, CHIPS[generation].shapes[chips], chips).name


def load_results(path: str) -> dict:
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out[(r["config"], r["topology"], r["step"], r["batch"], r["seq_len"], mesh_text(r["mesh"]))] = r
    return out


def expert_size(cfg: ModelConfig, step: str, chips: int) -> int:
    """MoE train steps: the expert axis, about the square root of the chips and at most EXPERT_PARALLEL (the
    batch splits over it: it is data parallel outside the MoE layers; non-expert weights are sharded over fsdp
    and tensor only, so a larger expert axis replicates them more). 1 otherwise."""
    ep = 1
    if step == "train" and cfg.n_routed_experts:
        while ep * 2 <= EXPERT_PARALLEL and (ep * 2) ** 2 <= chips and cfg.n_routed_experts % (ep * 2) == 0:
            ep *= 2
    return ep


def plan_mesh(cfg: ModelConfig, step: str, chips: int, tensor: int = 1) -> dict:
    """The mesh a row compiles on: `tensor` (tensor and sequence parallel), the expert axis (expert_size) and
    FSDP over the rest. Decode rows keep FSDP weights."""
    ep = expert_size(cfg, step, chips)
    return {"data": 1, "fsdp": chips // (ep * tensor), "tensor": tensor, "expert": ep}


def candidates(cfg: ModelConfig, case: str, generation: str, chips: int, tensor: int,
               seq: int) -> list[tuple[int, int]]:
    """(chips, tensor) the compile loop tries from the planned one on, until one fits: larger tensor axes on the
    same slice, then the next slices, each with the tensor sizes the plan's estimate does not rule out (it
    underestimates, so what it rules out does not fit)."""
    chip, step = CHIPS[generation], CASES[case][0]
    return [(c, t) for c in slices(chip) if c >= chips for t in tensor_sizes(cfg, step, c)
            if (c, t) == (chips, tensor) or ((c > chips or t > tensor) and planned(cfg, case, chip, c, t, seq))]


def compile_row(name: str, cfg: ModelConfig, generation: str, chips: int, tensor: int, case: str, batch: int,
                seq: int) -> dict:
    from nemojax.aot import compile_plan
    from nemojax.sharding import MeshConfig

    step, _ = CASES[case]
    plan = compile_plan(cfg, slice_name(generation, chips), MeshConfig(**plan_mesh(cfg, step, chips, tensor)),
                        step=step, batch=batch, seq_len=seq, remat="block" if step == "train" else None)
    return dict(plan, config=name)


def roofline(cfg: ModelConfig, chip: Chip, chips: int, step: str, batch: int, seq: int) -> tuple[float, float]:
    """(tokens/s, MFU) of the model FLOPs at the chip's peak, or its weight + cache streaming for decode."""
    flops = model_flops(cfg, step, batch, seq) / chips
    if step == "decode":
        per_chip = estimate_bytes(cfg, step, chips, batch, seq)
        seconds = max(flops / chip.bf16_flops, (per_chip["weights"] + per_chip["cache"]) / chip.hbm_bandwidth)
        return batch / seconds, flops / (seconds * chip.bf16_flops)
    return batch * seq / (flops / chip.bf16_flops), 1.0


def gb(n) -> str:
    return "–" if n is None else f"{n / 1e9:.1f}"


def render(rows: list[dict], results: dict) -> str:
    lines = ["# Scaling plans (generated by `benchmarks/scaling.py`; do not edit)", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             "Compiled rows come from `nemojax compile` on a CPU host (libtpu, no TPU): the TPU compiler's per-chip "
             "HBM (arguments + unaliased outputs + temporaries + code) against the capacity it allows, FLOPs from "
             "its cost analysis, and a roofline of max(FLOPs / bf16 peak, bytes accessed / HBM bandwidth). "
             "Roofline tokens/s and MFU are upper bounds, not measurements.", ""]
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    titles = {"train": f"## (a) Training: seq {TRAIN_SEQ}, global batch {GLOBAL_BATCH} (grad accumulation), "
                       "remat=block, FSDP (MoE: fsdp x expert), tensor and sequence parallel where FSDP alone does "
                       "not fit",
              "decode1": "## (b) Inference at full context, batch 1 (one decode step; FSDP weights)",
              "decode32": "## (b) Inference at full context, batch 32 (one decode step; FSDP weights)"}
    for case, case_rows in by_case.items():
        lines += [titles[case], "",
                  "| config | context | chip | planned slice | plan GB/chip | compiled | compiled GB/chip | fits | "
                  "roofline tokens/s | MFU (roofline) | compile s | H100s (plan) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in case_rows:
            step = CASES[case][0]
            compiled = [v for k, v in results.items() if k[0] == r["config"] and k[1].startswith(r["generation"])
                        and k[2] == step and (case == "train" or k[3] == r["batch"]) and k[4] == r["seq_len"]
                        and k[5] == mesh_text(plan_mesh(r["cfg"], step, v["chips"], v["mesh"]["tensor"]))]
            order = lambda c: (c["chips"], c["mesh"]["tensor"])            # noqa: E731
            fitting = sorted((c for c in compiled if c["fits"]), key=order)
            best = fitting[0] if fitting else (max(compiled, key=order) if compiled else None)
            planned = "none"
            if r["chips"]:
                planned = slice_name(r["generation"], r["chips"]) + (f" (tensor={r['tensor']})" if r["tensor"] > 1
                                                                      else "")
            if best:
                tps = best.get("tokens_per_second")
                # the MFU of a roofline is meaningful only where the compiler counted at least the model's FLOPs
                counted = best.get("mfu") and best["flops_per_step"] >= best["model_flops_per_chip"]
                mfu = f"{best['mfu']:.0%}" if counted else "n/a" if best.get("mfu") else "–"
                cells = [f"{best['topology']} ({mesh_text(best['mesh'])})", gb(best["hbm_bytes_per_chip"]),
                         "yes" if best["fits"] else "no", f"{tps:,.0f}" if tps else "–", mfu,
                         f"{best['compile_seconds']:.0f}"]
            else:
                tps, mfu = (roofline(r["cfg"], CHIPS[r["generation"]], r["chips"], CASES[case][0], r["batch"],
                                     r["seq_len"]) if r["chips"] else (None, None))
                cells = ["not yet", "–", "–", f"{tps:,.0f} (plan)" if tps else "–",
                         f"{mfu:.0%} (plan)" if mfu and case != "train" else "–", "–"]
            lines.append(f"| {r['config']} | {r['seq_len']:,} | {r['generation']} | {planned} | "
                         f"{gb(r.get('estimate_bytes'))} | " + " | ".join(cells) + f" | {r['h100'] or '>1024'} |")
        lines.append("")
    lines += ["## Notes", "", *NOTES]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="all")
    p.add_argument("--generations", default="v5p,v6e")
    p.add_argument("--cases", default="train,decode1,decode32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--budget-minutes", type=float, default=60)
    p.add_argument("--results", default="benchmarks/scaling_results.jsonl")
    p.add_argument("--out", default="docs/scaling.md")
    args = p.parse_args()
    paths = sorted(glob.glob("configs/*.yaml"))
    names = [os.path.basename(q)[:-5] for q in paths if not os.path.basename(q).startswith("tiny")]
    if args.configs != "all":
        names = [n for n in names if n in args.configs.split(",")]
    results = load_results(args.results)
    deadline = time.time() + 60 * args.budget_minutes
    rows = []
    for name in names:
        cfg = ModelConfig.from_yaml(f"configs/{name}.yaml")
        for case in args.cases.split(","):
            for gen in args.generations.split(","):
                row = dict(plan_row(name, cfg, case, CHIPS[gen]), config=name, case=case, generation=gen, cfg=cfg)
                row["h100"] = plan_row(name, cfg, case, H100)["chips"]
                rows.append(row)
                step = CASES[case][0]
                todo = candidates(cfg, case, gen, row["chips"], row["tensor"], row["seq_len"]) if row["chips"] else []
                for chips, tensor in todo:
                    if not args.compile or time.time() >= deadline:
                        break
                    batch = row_batch(case, chips, tensor)
                    key = (name, slice_name(gen, chips), step, batch, row["seq_len"],
                           mesh_text(plan_mesh(cfg, step, chips, tensor)))
                    if key not in results:
                        try:
                            results[key] = compile_row(name, cfg, gen, chips, tensor, case, batch, row["seq_len"])
                        except Exception as e:                  # reported; the row stays "not yet"
                            print(f"{key}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                            break
                        with open(args.results, "a") as f:
                            f.write(json.dumps(results[key]) + "\n")
                        print(json.dumps({k: results[key][k] for k in ("config", "topology", "step", "fits",
                                                                      "hbm_bytes_per_chip", "compile_seconds")}),
                              flush=True)
                    if results[key]["fits"]:
                        break
    with open(args.out, "w") as f:
        f.write(render(rows, results) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
