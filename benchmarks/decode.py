"""Decode throughput of nemojax.generate vs transformers' generate (same weights, greedy, CPU) for the ~123M
dense benchmark config at batch 1 and 8 (prompt 128, 128 new tokens), each framework in its own worker
process; per-token decode time of nemojax at context 512 vs 8192; and the fraction of this machine's measured
memory bandwidth reached (bytes of weights + Mamba state + KV read per decode step / step time).

    python benchmarks/decode.py [--repeats 3] [--new 128]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import BENCH_HF_CONFIG, Worker, bench_checkpoint, best_time, emit, interleaved_medians  # noqa: E402

PROMPT = 128


def _ids(batch: int, length: int):
    import numpy as np

    return np.random.default_rng(batch * 1000 + length).integers(3, BENCH_HF_CONFIG["vocab_size"], (batch, length))


DECODE_STEPS = 32


def nemojax_worker(ckpt: str, new: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nemojax import load_hf
    from nemojax.generate import _decode_step, _prefill, generate

    model = load_hf(ckpt)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("n",))
    def decode_steps(state, cache, tok, n):
        """n greedy decode steps from a prefilled cache (what one token costs at this context)."""
        def body(_, carry):
            cache, tok = carry
            logits, cache = _decode_step(graphdef, state, tok, cache)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, n, body, (cache, tok))[1]

    tasks = {}
    for b in (1, 8):
        ids = _ids(b, PROMPT)
        tasks[f"gen{b}"] = lambda ids=ids: generate(model, ids, max_new_tokens=new)
    for ctx in (512, 8192):
        ids = jnp.asarray(_ids(1, ctx), jnp.int32)
        logits, cache = _prefill(graphdef, state, ids, jnp.ones_like(ids), ctx + DECODE_STEPS)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        tasks[f"ctx{ctx}"] = (lambda cache=cache, tok=tok:
                              decode_steps(state, cache, tok, DECODE_STEPS).block_until_ready())
    tasks["tokens1"] = lambda: np.asarray(generate(model, _ids(1, PROMPT), max_new_tokens=new))[:, PROMPT:]
    return tasks


def hf_worker(ckpt: str, new: int) -> dict:
    import torch
    from transformers import NemotronHForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = NemotronHForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def gen(ids):
        with torch.inference_mode():
            return model.generate(torch.from_numpy(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)

    tasks = {f"gen{b}": (lambda ids=_ids(b, PROMPT): gen(ids)) for b in (1, 8)}
    tasks["tokens1"] = lambda: gen(_ids(1, PROMPT)).numpy()[:, PROMPT:]
    return tasks


def memory_bandwidth_gbs() -> float:
    """Streaming copy of a 512 MiB buffer (read + write), best of 5 after a warm-up copy."""
    import numpy as np

    a = np.ones(64 * 1024 * 1024, np.float64)
    b = np.empty_like(a)
    return 2 * a.nbytes / best_time(lambda: np.copyto(b, a), 5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()

    import jax
    from flax import nnx

    from nemojax.config import ModelConfig
    from nemojax.convert.hf import param_count
    from nemojax.model import abstract_model, cache_bytes

    with bench_checkpoint() as ckpt:
        cfg = ModelConfig.from_hf(ckpt)
        workers = {"nemojax": Worker(nemojax_worker, ckpt, args.new), "hf": Worker(hf_worker, ckpt, args.new)}
        same = bool((workers["nemojax"].result("tokens1") == workers["hf"].result("tokens1")).all())
        bandwidth = memory_bandwidth_gbs()
        emit({"bench": "decode", "params": param_count(cfg), "cpus": os.cpu_count(), "prompt": PROMPT,
              "new_tokens": args.new, "greedy_tokens_identical": same, "memory_bandwidth_gbs": round(bandwidth, 1)})
        for b in (1, 8):
            t = interleaved_medians(workers, f"gen{b}", args.repeats)
            emit({"batch": b, "nemojax_tok_s": round(b * args.new / t["nemojax"], 1),
                  "hf_tok_s": round(b * args.new / t["hf"], 1), "ratio": round(t["hf"] / t["nemojax"], 2)})
        hf = workers.pop("hf")
        hf.close()
        per_token = {}
        for ctx in (512, 8192):
            t = interleaved_medians({"nemojax": workers["nemojax"]}, f"ctx{ctx}", max(args.repeats, 5))["nemojax"]
            per_token[ctx] = t / DECODE_STEPS
            graphdef, state = abstract_model(cfg)
            cache = cache_bytes(jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(1, ctx + DECODE_STEPS)))
            weight_bytes = 4 * (param_count(cfg) - cfg.vocab_size * cfg.hidden_size)   # one embedding row read
            step_bytes = weight_bytes + 2 * cache["MambaState"] + cache["KVCache"]      # state read + write
            emit({"context": ctx, "ms_per_token": round(1000 * per_token[ctx], 2),
                  "bytes_per_token_mb": round(step_bytes / 1e6, 1),
                  "roofline_fraction": round(step_bytes / per_token[ctx] / 1e9 / bandwidth, 3)})
        emit({"ms_per_token_8192_over_512": round(per_token[8192] / per_token[512], 3)})
        workers["nemojax"].close()


if __name__ == "__main__":
    main()
