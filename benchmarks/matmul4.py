"""4-bit weight matmul on an accelerator: the Pallas kernel (NVFP4 and int4-g128) vs bf16 jnp.dot at
M in {1, 16, 256} and K = N in {4096, 8192, 16384}, printing times and ratios. Without a GPU/TPU it says so
and exits (the kernel is checked in interpret mode by the tests).

    python benchmarks/matmul4.py [--sizes 4096 8192 16384] [--m 1 16 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import best_time as timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from pallas_kernels.matmul4 import matmul4, quantize

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        print(json.dumps({"bench": "matmul4", "skipped": f"backend {backend!r}: needs a GPU or TPU"}))
        return
    for size in args.sizes:
        w = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
        packed = {"nvfp4": quantize(w, "nvfp4"), "int4": quantize(w, "int4", 128)}
        dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
        for m in args.m:
            x = jax.random.normal(jax.random.key(1), (m, size), jnp.bfloat16)
            rec = {"K": size, "N": size, "M": m,
                   "bf16_us": 1e6 * timed(lambda: dense(x, w).block_until_ready(), args.repeats)}
            for fmt, p in packed.items():
                f = jax.jit(lambda x, p: matmul4(x, p))
                rec[f"{fmt}_us"] = 1e6 * timed(lambda: f(x, p).block_until_ready(), args.repeats)
                rec[f"{fmt}_speedup"] = rec["bf16_us"] / rec[f"{fmt}_us"]
                if m == 1:            # issue 14: >= 2.5x bf16 at M = 1 (performance.md: int4 >= 3x)
                    rec[f"{fmt}_goal_met"] = rec[f"{fmt}_speedup"] >= (3.0 if fmt == "int4" else 2.5)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)


if __name__ == "__main__":
    main()
