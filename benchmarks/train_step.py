"""Training throughput of nemojax (jitted train step: forward, backward, AdamW with clipping) vs transformers
NemotronHForCausalLM + torch.optim.AdamW on CPU, same ~123M dense config and weights, same batch, fp32, each
framework in its own worker process with interleaved timing. Also reports model FLOPs utilisation against this
machine's measured fp32 matmul peak (6 * params * tokens + attention FLOPs per step). Both workers run with
nemojax.host_allocator's glibc settings (what `import nemojax` applies on CPU); --default-malloc runs both
with glibc's defaults instead.

    python benchmarks/train_step.py [--batch 2] [--seq 512] [--repeats 3] [--default-malloc]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import BENCH_HF_CONFIG, Worker, bench_checkpoint, best_time, emit, interleaved_medians  # noqa: E402


def _batch(batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(seq).integers(0, BENCH_HF_CONFIG["vocab_size"], (batch, seq + 1))


def nemojax_worker(ckpt: str, batch: int, seq: int) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from nemojax import load_hf
    from nemojax.train.optim import OptimConfig, make_optimizer, schedule
    from nemojax.train.trainer import TrainConfig, make_train_step

    model = load_hf(ckpt, dtype="float32")
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    opt = nnx.Optimizer(model, make_optimizer(optim, 1000), wrt=nnx.Param)
    step = make_train_step(model.config, TrainConfig(optim=optim), schedule(optim, 1000))
    tokens = jnp.asarray(_batch(batch, seq), jnp.int32)
    return {"step": lambda: float(step(model, opt, tokens)["loss"]),
            "first_loss": lambda: float(step(model, opt, tokens)["loss"])}


def hf_worker(ckpt: str, batch: int, seq: int) -> dict:
    import torch
    from transformers import NemotronHForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = NemotronHForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tokens = torch.from_numpy(_batch(batch, seq)).long()

    def step() -> float:
        # HF shifts labels itself; inputs are the first seq tokens as in nemojax's step (which predicts the
        # last seq of the seq + 1 window)
        out = model(tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return {"step": step, "first_loss": step}


def matmul_peak_gflops(n: int = 2048) -> float:
    """Best fp32 jnp.dot throughput of an n x n x n product (GFLOP/s)."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / best_time(lambda: f(a, a).block_until_ready(), 5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc at its defaults in both workers (nemojax.host_allocator not applied)")
    args = ap.parse_args()
    tuned = not args.default_malloc

    from nemojax.config import ModelConfig
    from nemojax.convert.hf import param_count

    with bench_checkpoint() as ckpt:
        cfg = ModelConfig.from_hf(ckpt)
        workers = {"nemojax": Worker(nemojax_worker, ckpt, args.batch, args.seq, tuned_malloc=tuned),
                   "hf": Worker(hf_worker, ckpt, args.batch, args.seq, tuned_malloc=tuned)}
        first = {name: w.result("first_loss") for name, w in workers.items()}      # same weights, same batch
        t = interleaved_medians(workers, "step", args.repeats)
        for w in workers.values():
            w.close()
        tokens = args.batch * args.seq
        n = param_count(cfg)
        attn_layers = cfg.pattern.count("*")
        # causal attention: QK^T and PV, half the square, x3 for forward + backward
        attn_flops = 3 * attn_layers * 2 * 2 * args.batch * args.seq ** 2 / 2 * cfg.num_attention_heads * cfg.head_dim
        step_flops = 6 * n * tokens + attn_flops
        peak = matmul_peak_gflops()
        emit({"bench": "train_step", "params": n, "batch": args.batch, "seq": args.seq, "cpus": os.cpu_count(),
              "malloc": "tuned" if tuned else "default",
              "first_loss_nemojax": round(first["nemojax"], 4), "first_loss_hf": round(first["hf"], 4)})
        emit({"nemojax_tok_s": round(tokens / t["nemojax"], 1), "hf_tok_s": round(tokens / t["hf"], 1),
              "ratio": round(t["hf"] / t["nemojax"], 2), "matmul_peak_gflops": round(peak, 1),
              "nemojax_mfu": round(step_flops / t["nemojax"] / 1e9 / peak, 3),
              "hf_mfu": round(step_flops / t["hf"] / 1e9 / peak, 3)})


if __name__ == "__main__":
    main()
