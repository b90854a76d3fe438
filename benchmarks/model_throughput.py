"""nemojax's own throughput on the current backend (GPU, TPU or CPU): prefill and decode tokens/s, and train-step
tokens/s with model FLOPs utilisation, for a config with random weights. Prints JSON lines with the goals of
shared research performance.md beside the figures: decode at batch 1 >= 70% of the weight-bandwidth roofline,
training >= 30% MFU (the hybrid, counting the compiler's FLOPs).

    python benchmarks/model_throughput.py [--config configs/nemotron_h_8b.yaml] [--dtype bfloat16]
        [--prompt 2048] [--new 128] [--train-layers 8 --train-batch 4 --train-seq 4096] [--repeats 3]

The train step runs on the first --train-layers layers of the pattern (the widths of the full model, a memory
budget one accelerator holds); prefill and decode use the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import best_time  # noqa: E402

# (bf16 dense FLOP/s, HBM bytes/s) by device kind; unknown devices report rates without the fractions
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "TPU v5 lite": (197e12, 0.819e12),
         "TPU v6 lite": (918e12, 1.64e12), "TPU v5": (459e12, 2.765e12), "TPU v4": (275e12, 1.2e12)}
DECODE_GOAL, MFU_GOAL = 0.70, 0.30


def peaks(device) -> tuple:
    kind = device.device_kind
    return next((v for k, v in sorted(PEAKS.items(), key=lambda kv: -len(kv[0])) if k in kind), (None, None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/nemotron_h_8b.yaml")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--train-layers", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from nemojax.config import ModelConfig
    from nemojax.generate import generate
    from nemojax.model import NemotronH, count_params
    from nemojax.train.trainer import TrainConfig, make_train_step

    device = jax.devices()[0]
    peak_flops, peak_bw = peaks(device)
    cfg = ModelConfig.from_yaml(args.config, dtype=args.dtype, param_dtype=args.dtype)
    model = NemotronH(cfg, nnx.Rngs(0))
    params = count_params(model)
    rng = np.random.default_rng(0)
    emit = lambda rec: print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}),
                             flush=True)
    emit({"bench": "model_throughput", "config": args.config, "device": device.device_kind, "params": params,
          "dtype": args.dtype})

    prompt = rng.integers(3, cfg.vocab_size, (1, args.prompt)).astype(np.int32)
    forward = nnx.jit(lambda m, ids: m(ids)[:, -1])
    t = best_time(lambda: forward(model, jnp.asarray(prompt)).block_until_ready(), args.repeats)
    emit({"prefill_tokens": args.prompt, "prefill_tok_s": args.prompt / t})

    weight_bytes = params * jnp.dtype(args.dtype).itemsize
    for batch in (1, 8):
        ids = rng.integers(3, cfg.vocab_size, (batch, 64)).astype(np.int32)
        short, long = (best_time(lambda n=n: generate(model, ids, max_new_tokens=n), args.repeats)
                       for n in (1, args.new + 1))
        per_token = (long - short) / args.new                    # decode steps only, prefill subtracted
        rec = {"decode_batch": batch, "decode_tok_s": batch / per_token, "ms_per_step": 1e3 * per_token}
        if batch == 1 and peak_bw:
            rec["weight_roofline_fraction"] = weight_bytes / peak_bw / per_token
            rec["goal"] = f">= {DECODE_GOAL} of the weight-bandwidth roofline"
            rec["goal_met"] = rec["weight_roofline_fraction"] >= DECODE_GOAL
        emit(rec)

    tcfg = cfg.replace(pattern=cfg.pattern[:args.train_layers], num_nextn_predict_layers=0, remat="block")
    train_model = NemotronH(tcfg, nnx.Rngs(0))
    opt = nnx.Optimizer(train_model, optax.adamw(1e-4), wrt=nnx.Param)
    step = make_train_step(tcfg, TrainConfig(steps=10), optax.constant_schedule(1e-4))
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (args.train_batch, args.train_seq + 1)), jnp.int32)
    flops = step.lower(train_model, opt, tokens).compile().cost_analysis()["flops"]
    t = best_time(lambda: jax.block_until_ready(step(train_model, opt, tokens)), args.repeats)
    rec = {"train_layers": tcfg.pattern, "train_tokens": args.train_batch * args.train_seq,
           "train_tok_s": args.train_batch * args.train_seq / t, "step_tflop": flops / 1e12}
    if peak_flops:
        rec.update(mfu=flops / t / peak_flops, goal=f">= {MFU_GOAL} MFU", goal_met=flops / t / peak_flops >= MFU_GOAL)
    emit(rec)


if __name__ == "__main__":
    main()
