"""Scaling plans for every published config: the smallest TPU v5p and v6e slice (and the H100 count) on which
(a) a train step at seq 8192 fits and (b) inference at the model's full context fits at batch 1 and 32, with
roofline tokens/s and MFU. Writes docs/scaling.md.

    python benchmarks/scaling.py [--configs nemotron_h_8b,...] [--generations v5p,v6e] [--cases train,decode1,decode32]
        [--compile] [--budget-minutes 60] [--results benchmarks/scaling_results.jsonl] [--out docs/scaling.md]

Two sources, kept apart in the table:
  plan      per-chip memory arithmetic (below): parameters, gradients and AdamW state sharded over every chip
            (FSDP), activations of a block-remat train step, KV cache and Mamba state at full context. It picks the
            smallest slice whose estimate is under 90% of the chip's HBM. Instant; an estimate.
  compiled  `nemojax compile` (nemojax.aot.compile_plan) of that step on that slice: the TPU compiler's own
            per-chip memory, FLOPs and the roofline. --compile compiles each planned row (the smallest planned
            slice, then the next size up while it does not fit) until --budget-minutes is spent; results
            accumulate in --results across runs, so the table fills in as more is compiled.

H100 count: the same per-device arithmetic with 80 GB devices (GPU rows are never compiled here).
Train: global batch 768 x 8192 tokens (the Megatron-Bridge recipes' GBS) reached with gradient accumulation over
per-step batches of one sequence per chip (capped at 768); remat=block; AdamW fp32 state; bf16 compute.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemojax.aot import CHIPS, H100, Chip, Topology, model_flops  # noqa: E402
from nemojax.config import ModelConfig  # noqa: E402
from nemojax.convert.hf import param_count  # noqa: E402
from nemojax.sharding import AXES  # noqa: E402

HEADROOM = 0.9                      # a plan must leave 10% of HBM for the runtime and fragmentation
TRAIN_SEQ, GLOBAL_BATCH = 8192, 768
EXPERT_PARALLEL = 8                 # MoE train steps: experts split at most 8 ways (plan_mesh)
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
    "- Super on v6e: no slice is compiled. Per-chip temporaries of one 8192-token sequence (~45 GB on v5p) "
    "exceed v6e's 31.25 GB whatever the slice; it needs the sequence or the MLP width split (tensor "
    "parallelism), which this planner does not try.",
    "- Nemotron 3 Nano on v6e: v6e-32 (fsdp=8, expert=4) asked 33.9 GB per chip against 31.25 GB; v6e-64 "
    "(fsdp=8, expert=8) fits at 27.1 GB. 47B on v6e: the planned v6e-256 (fsdp=256) asked 43.2 GB per chip "
    "(the plan said 28.7); like 56B it needs tensor parallelism or sequence sharding on v6e.",
    "- 56B on v6e: no slice up to v6e-256 fits with FSDP alone (one 8192-token sequence per chip needs ~24 GB "
    "of activations and logits); tensor parallelism or sequence sharding would be needed and is not planned here.",
    "- MFU \"n/a\": the compiler's FLOP count of the partitioned program came out below the model FLOPs (scanned "
    "steps count a loop body once), so the roofline is the model FLOPs at peak and says nothing about utilisation.",
]


def context(name: str, cfg: ModelConfig) -> int:
    return CONTEXT.get(name, cfg.max_position_embeddings)


def estimate_bytes(cfg: ModelConfig, step: str, chips: int, batch: int, seq: int) -> dict:
    """Per-device bytes of one step with everything sharded over `chips` devices (FSDP for weights and state,
    the batch over chips where it divides). Rough by design: the compiled rows are the truth."""
    n = param_count(cfg)
    d, layers = cfg.hidden_size, cfg.num_layers
    rows = batch / chips if batch >= chips else batch          # rows held per device (replicated below chips)
    if step == "train":
        tokens = rows * seq
        widest = max(cfg.mamba_in_proj_dim, 2 * cfg.intermediate_size,
                     2 * cfg.num_experts_per_tok * cfg.moe_intermediate_size)
        return {"state": 16 * n / chips,                                   # fp32 weights, grads, Adam m and v
                "activations": tokens * (2 * d * layers                    # bf16 block inputs kept by remat
                                         + 4 * widest * 2                  # one block's recompute working set
                                         + 2 * 4 * cfg.vocab_size)}        # fp32 logits and their gradient
    kv = 2 * cfg.pattern.count("*") * cfg.num_key_value_heads * cfg.head_dim * seq * 2
    ssm = cfg.pattern.count("M") * (cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
                                    + (cfg.conv_kernel - 1) * cfg.mamba_conv_dim * 2)
    return {"weights": 2 * n / chips, "cache": rows * (kv + ssm),
            "activations": rows * 4 * cfg.vocab_size + 64 * 2 ** 20}


def slices(chip: Chip) -> list[int]:
    return sorted(chip.shapes) if chip.shapes else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def plan_row(name: str, cfg: ModelConfig, case: str, chip: Chip) -> dict:
    step, batch = CASES[case]
    seq = TRAIN_SEQ if step == "train" else context(name, cfg)
    for chips in slices(chip):
        b = min(chips, GLOBAL_BATCH) if step == "train" else batch
        parts = estimate_bytes(cfg, step, chips, b, seq)
        if sum(parts.values()) <= HEADROOM * chip.hbm_bytes:
            return {"chips": chips, "batch": b, "seq_len": seq, "estimate_bytes": int(sum(parts.values())),
                    "estimate": {k: int(v) for k, v in parts.items()}}
    return {"chips": None, "batch": batch, "seq_len": seq}


def slice_name(generation: str, chips: int) -> str:
    return Topology(generation, CHIPS[generation].shapes[chips], chips).name


def mesh_key(mesh: dict) -> str:
    return ",".join(f"{a}={mesh[a]}" for a in AXES if mesh.get(a, 1) > 1)


def load_results(path: str) -> dict:
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out[(r["config"], r["topology"], r["step"], r["batch"], r["seq_len"], mesh_key(r["mesh"]))] = r
    return out


def plan_mesh(cfg: ModelConfig, step: str, chips: int) -> dict:
    """The mesh a row compiles on: FSDP over every chip, and for MoE train steps fsdp x expert with the expert
    axis about the square root of the chips, at most EXPERT_PARALLEL (the batch splits over both: the expert
    axis is data parallel outside the MoE layers; non-expert weights are sharded over fsdp only, so a larger
    expert axis replicates them more). Decode rows keep FSDP weights."""
    ep = 1
    if step == "train" and cfg.n_routed_experts:
        while ep * 2 <= EXPERT_PARALLEL and (ep * 2) ** 2 <= chips and cfg.n_routed_experts % (ep * 2) == 0:
            ep *= 2
    return {"data": 1, "fsdp": chips // ep, "tensor": 1, "expert": ep}


def compile_row(name: str, cfg: ModelConfig, generation: str, chips: int, case: str, batch: int, seq: int) -> dict:
    from nemojax.aot import compile_plan
    from nemojax.sharding import MeshConfig

    step, _ = CASES[case]
    plan = compile_plan(cfg, slice_name(generation, chips), MeshConfig(**plan_mesh(cfg, step, chips)), step=step,
                        batch=batch, seq_len=seq, remat="block" if step == "train" else None)
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
                       "remat=block, FSDP over all chips (MoE: fsdp x expert)",
              "decode1": "## (b) Inference at full context, batch 1 (one decode step; FSDP weights)",
              "decode32": "## (b) Inference at full context, batch 32 (one decode step; FSDP weights)"}
    for case, case_rows in by_case.items():
        lines += [titles[case], "",
                  "| config | context | chip | planned slice | plan GB/chip | compiled | compiled GB/chip | fits | "
                  "roofline tokens/s | MFU (roofline) | compile s | H100s (plan) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in case_rows:
            compiled = [v for k, v in results.items() if k[0] == r["config"] and k[1].startswith(r["generation"])
                        and k[2] == CASES[case][0] and (case == "train" or k[3] == r["batch"])
                        and k[4] == r["seq_len"] and k[5] == mesh_key(plan_mesh(r["cfg"], CASES[case][0], v["chips"]))]
            fitting = sorted((c for c in compiled if c["fits"]), key=lambda c: c["chips"])
            best = fitting[0] if fitting else (max(compiled, key=lambda c: c["chips"]) if compiled else None)
            planned = slice_name(r["generation"], r["chips"]) if r["chips"] else "none"
            if best:
                tps = best.get("tokens_per_second")
                # the MFU of a roofline is meaningful only where the compiler counted at least the model's FLOPs
                counted = best.get("mfu") and best["flops_per_step"] >= best["model_flops_per_chip"]
                mfu = f"{best['mfu']:.0%}" if counted else "n/a" if best.get("mfu") else "–"
                cells = [f"{best['topology']} ({mesh_key(best['mesh'])})", gb(best["hbm_bytes_per_chip"]),
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
                chips = row["chips"]
                while args.compile and chips and time.time() < deadline:
                    batch = min(chips, GLOBAL_BATCH) if case == "train" else row["batch"]
                    key = (name, slice_name(gen, chips), CASES[case][0], batch, row["seq_len"],
                           mesh_key(plan_mesh(cfg, CASES[case][0], chips)))
                    if key not in results:
                        try:
                            results[key] = compile_row(name, cfg, gen, chips, case, batch, row["seq_len"])
                        except Exception as e:                  # reported; the row stays "not yet"
                            print(f"{key}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                            break
                        with open(args.results, "a") as f:
                            f.write(json.dumps(results[key]) + "\n")
                        print(json.dumps({k: results[key][k] for k in ("config", "topology", "step", "fits",
                                                                      "hbm_bytes_per_chip", "compile_seconds")}),
                              flush=True)
                    bigger = [c for c in slices(CHIPS[gen]) if c > chips]
                    if results[key]["fits"] or not bigger:
                        break
                    chips = bigger[0]
    with open(args.out, "w") as f:
        f.write(render(rows, results) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
