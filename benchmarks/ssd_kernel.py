"""SSD scan on an accelerator: the Pallas kernel vs the XLA chunked SSD (and mamba_ssm's Triton
mamba_chunk_scan_combined when importable) at Nemotron-H-8B layer shapes (H=128, P=64, N=128, G=8, Q=128),
forward and forward+backward, with achieved GB/s (inputs + outputs read/written once) against the HBM roofline.
On a machine without a GPU/TPU it says so and exits (the kernels are checked in interpret mode by the tests).

    python benchmarks/ssd_kernel.py [--seq 4096 16384 65536] [--batch 1] [--repeats 10] [--hbm-gbs 3350]
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
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--hbm-gbs", type=float, default=3350.0, help="HBM bandwidth of the device (H100 SXM: 3350)")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from nemojax.ssd import ssd

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        print(json.dumps({"bench": "ssd_kernel", "skipped": f"backend {backend!r}: needs a GPU or TPU"}))
        return
    h, p, n, g, q = 128, 64, 128, 8, 128
    for t in args.seq:
        k = jax.random.split(jax.random.key(t), 6)
        b = args.batch
        x = jax.random.normal(k[0], (b, t, h, p), jnp.bfloat16)
        dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 2)
        A = -jnp.exp(jax.random.normal(k[2], (h,)) * 0.5)
        B = jax.random.normal(k[3], (b, t, g, n), jnp.bfloat16)
        C = jax.random.normal(k[4], (b, t, g, n), jnp.bfloat16)
        impls = {"pallas": lambda *a: ssd(*a, impl="pallas", chunk_size=q),
                 "xla": lambda *a: ssd(*a, impl="chunked", chunk_size=q)}
        rec = {"seq": t, "batch": b}
        outs = {}
        for name, f in impls.items():
            fwd = jax.jit(lambda x, dt, A, B, C, f=f: f(x, dt, A, B, C)[0])
            grad = jax.jit(jax.grad(lambda x, dt, A, B, C, f=f: jnp.sum(f(x, dt, A, B, C)[0]), argnums=(0, 1, 3, 4)))
            outs[name] = fwd(x, dt, A, B, C)
            rec[f"{name}_fwd_ms"] = 1e3 * timed(lambda: fwd(x, dt, A, B, C).block_until_ready(), args.repeats)
            rec[f"{name}_fwdbwd_ms"] = 1e3 * timed(lambda: jax.block_until_ready(grad(x, dt, A, B, C)),
                                                   args.repeats)
        rec["max_rel_diff"] = float(jnp.abs(outs["pallas"] - outs["xla"]).max() / jnp.abs(outs["xla"]).max())
        io_bytes = x.nbytes + B.nbytes + C.nbytes + dt.nbytes + b * t * h * p * 4
        rec["pallas_fwd_gbs"] = io_bytes / rec["pallas_fwd_ms"] * 1e-6
        rec["pallas_fwd_roofline"] = rec["pallas_fwd_gbs"] / args.hbm_gbs
        rec["fwd_speedup_vs_xla"] = rec["xla_fwd_ms"] / rec["pallas_fwd_ms"]
        rec["fwdbwd_speedup_vs_xla"] = rec["xla_fwdbwd_ms"] / rec["pallas_fwdbwd_ms"]
        rec["goal_fwdbwd_2x_xla_met"] = rec["fwdbwd_speedup_vs_xla"] >= 2.0
        try:
            import torch
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            tx = torch.randn(b, t, h, p, device="cuda", dtype=torch.bfloat16)
            tdt = torch.rand(b, t, h, device="cuda") * 0.1
            tA = -torch.rand(h, device="cuda")
            tB = torch.randn(b, t, g, n, device="cuda", dtype=torch.bfloat16)
            tC = torch.randn(b, t, g, n, device="cuda", dtype=torch.bfloat16)

            def run():
                mamba_chunk_scan_combined(tx, tdt, tA, tB, tC, q)
                torch.cuda.synchronize()

            rec["mamba_ssm_fwd_ms"] = 1e3 * timed(run, args.repeats)
            rec["fwd_speedup_vs_mamba_ssm"] = rec["mamba_ssm_fwd_ms"] / rec["pallas_fwd_ms"]
            rec["goal_fwd_as_fast_as_mamba_ssm_met"] = rec["fwd_speedup_vs_mamba_ssm"] >= 1.0
        except ImportError as e:
            rec["mamba_ssm"] = f"not available ({e.name})"
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)


if __name__ == "__main__":
    main()
