"""Memory of one-shot vs chunked prefill at long prompts: the compiler's temporary bytes (XLA memory_analysis of
the compiled prefill, nothing allocated) side by side, and optionally the measured time of both on the current
backend. Prints one JSON line per prompt length and the ratio one-shot / chunked.

    python benchmarks/chunked_prefill.py [--config configs/tiny.yaml] [--lengths 8192,32768,131072]
        [--chunk 8192] [--run-up-to 16384] [--run-chunked-up-to 131072]

Chunked prefill left-pads the prompt to a multiple of the chunk and scans over chunks in EXTEND mode (the
Mamba states and KV cache carried), so temporaries follow the chunk; the KV cache itself (an argument/output,
not a temporary) still grows with the prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemojax.config import ModelConfig  # noqa: E402
from nemojax.generate import _prefill  # noqa: E402
from nemojax.model import NemotronH  # noqa: E402


def compiled(graphdef, state, b, p, max_len, chunk):
    ids = jax.ShapeDtypeStruct((b, p), jnp.int32)
    t0 = time.perf_counter()
    exe = _prefill.lower(graphdef, state, ids, ids, max_len, chunk).compile()
    return exe, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--run-up-to", type=int, default=16384, help="also time both forms up to this length")
    ap.add_argument("--run-chunked-up-to", type=int, default=16384,
                    help="time the chunked form up to this length (e.g. 131072), and report the process's peak RSS "
                         "after it (run with --run-up-to 0 to see the chunked form's own peak)")
    args = ap.parse_args()
    cfg = ModelConfig.from_yaml(args.config)
    graphdef, state = nnx.split(NemotronH(cfg, nnx.Rngs(0)))
    print(json.dumps({"device": jax.devices()[0].device_kind, "config": args.config, "chunk": args.chunk}))
    for p in map(int, args.lengths.split(",")):
        p_chunked = -(-p // args.chunk) * args.chunk
        row = {"prompt": p}
        for name, length, chunk in (("one_shot", p, None), ("chunked", p_chunked, args.chunk)):
            exe, seconds = compiled(graphdef, state, 1, length, length + 1, chunk)
            mem = exe.memory_analysis()
            row[f"{name}_temp_bytes"] = int(mem.temp_size_in_bytes)
            row[f"{name}_output_bytes"] = int(mem.output_size_in_bytes)
            row[f"{name}_compile_s"] = round(seconds, 2)
            if p <= (args.run_chunked_up_to if chunk else args.run_up_to):
                ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, length)), jnp.int32)
                exe(state, ids, jnp.ones_like(ids))[0].block_until_ready()
                t0 = time.perf_counter()
                exe(state, ids, jnp.ones_like(ids))[0].block_until_ready()
                row[f"{name}_run_s"] = round(time.perf_counter() - t0, 3)
                row[f"peak_rss_bytes_after_{name}"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["temp_ratio_one_shot_over_chunked"] = round(row["one_shot_temp_bytes"] / row["chunked_temp_bytes"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
