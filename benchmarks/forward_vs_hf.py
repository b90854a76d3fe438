"""Same-weights forward throughput of nemojax (jax.jit, fp32) vs transformers NemotronHForCausalLM (torch, fp32)
on CPU, for a ~123M dense config at sequence lengths 1024 and 4096. Prints one JSON line per length with
tokens/s of each and the ratio (HF time / nemojax time).

    python benchmarks/forward_vs_hf.py [--seq 1024 4096] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import BENCH_HF_CONFIG, Worker, bench_checkpoint, emit, interleaved_medians  # noqa: E402


def _ids(seq: int, batch: int):
    import numpy as np

    return np.random.default_rng(seq).integers(0, BENCH_HF_CONFIG["vocab_size"], (batch, seq))


def nemojax_worker(ckpt: str, seqs: list, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax import load_hf, make_forward

    forward = make_forward(load_hf(ckpt, dtype="float32"))
    tasks = {"info": lambda: {"jax": jax.__version__, "device": jax.devices()[0].device_kind}}
    for seq in seqs:
        ids = jnp.asarray(_ids(seq, batch), jnp.int32)
        tasks[f"run{seq}"] = lambda ids=ids: forward(ids).block_until_ready()
        tasks[f"logits{seq}"] = lambda ids=ids: np.asarray(forward(ids)[:, ::64])
    return tasks


def hf_worker(ckpt: str, seqs: list, batch: int) -> dict:
    import torch
    from transformers import NemotronHForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = NemotronHForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tasks = {"info": lambda: {"torch": torch.__version__, "threads": torch.get_num_threads()}}

    def run(ids):
        with torch.inference_mode():
            return model(ids).logits

    for seq in seqs:
        ids = torch.from_numpy(_ids(seq, batch))
        tasks[f"run{seq}"] = lambda ids=ids: run(ids)
        tasks[f"logits{seq}"] = lambda ids=ids: run(ids)[:, ::64].numpy()
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np

    from nemojax.config import ModelConfig
    from nemojax.convert.hf import param_count

    with bench_checkpoint() as ckpt:
        workers = {"nemojax": Worker(nemojax_worker, ckpt, args.seq, args.batch),
                   "hf": Worker(hf_worker, ckpt, args.seq, args.batch)}
        emit({"bench": "forward_vs_hf", "params": param_count(ModelConfig.from_hf(ckpt)), "cpus": os.cpu_count(),
              **workers["nemojax"].result("info"), **workers["hf"].result("info")})
        for seq in args.seq:
            a, b = workers["nemojax"].result(f"logits{seq}"), workers["hf"].result(f"logits{seq}")
            t = interleaved_medians(workers, f"run{seq}", args.repeats)
            tokens = args.batch * seq
            emit({"seq": seq, "batch": args.batch, "nemojax_tok_s": round(tokens / t["nemojax"], 1),
                  "hf_tok_s": round(tokens / t["hf"], 1), "ratio": round(t["hf"] / t["nemojax"], 2),
                  "rel_logit_diff": float(np.abs(a - b).max() / np.abs(b).max())})
        for w in workers.values():
            w.close()


if __name__ == "__main__":
    main()
