"""Peak host memory of `nemojax convert hf-to-orbax` on a ~1B-parameter random checkpoint, against the
checkpoint's size: the conversion streams each tensor block from safetensors into its place (load_hf reads
slices, never the whole file), so the peak should stay near the model plus one tensor, not a multiple of it.

    python benchmarks/load_memory.py [--hidden 2048] [--layers 24] [--dtype bfloat16] [--dir /tmp/nemojax-1b]

Writes the random HF checkpoint once (kept in --dir for reruns), then runs the conversion in a child process
and reads its peak RSS (getrusage of the child) and its wall time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_checkpoint(directory: str, hidden: int, layers: int, dtype: str) -> int:
    """A random NemotronH checkpoint in HF format (Mamba/MLP pattern with one attention layer per 8)."""
    import jax
    from flax import nnx

    from nemojax.config import ModelConfig, RuntimeOptions
    from nemojax.convert.hf import param_count, save_hf
    from nemojax.model import NemotronH

    pattern = "".join("*" if i % 8 == 7 else ("M" if i % 2 == 0 else "-") for i in range(layers))
    cfg = ModelConfig(vocab_size=131072, hidden_size=hidden, pattern=pattern, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=128, intermediate_size=4 * hidden, mamba_num_heads=hidden // 32,
                      mamba_head_dim=64, ssm_state_size=128, n_groups=8,
                      runtime=RuntimeOptions(dtype=dtype, param_dtype=dtype))
    if not os.path.isfile(os.path.join(directory, "config.json")):
        with jax.default_device(jax.devices("cpu")[0]):
            model = NemotronH(cfg, nnx.Rngs(0))
        save_hf(model, directory, max_shard_size="2GB", force=True)
        del model
    return param_count(cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dir", default="/tmp/nemojax-1b")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    if args.build_only:
        build_checkpoint(os.path.join(args.dir, "hf"), args.hidden, args.layers, args.dtype)
        return
    src, dst = os.path.join(args.dir, "hf"), os.path.join(args.dir, "orbax")
    if not os.path.isfile(os.path.join(src, "config.json")):   # built in a child, whose memory is not this one's
        subprocess.run([sys.executable, __file__, "--build-only", *sys.argv[1:]], check=True)
    n = build_checkpoint(src, args.hidden, args.layers, args.dtype)     # (the parameter count; already built)
    files = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    with open(os.path.join(args.dir, "convert.log"), "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nemojax.cli", "convert", "hf-to-orbax", src, dst, "--dtype",
                                 args.dtype], env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)          # this child's own rusage
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            sys.exit(log.read()[-2000:])
    peak = usage.ru_maxrss * 1024                     # kB on Linux
    out = {"parameters": n, "dtype": args.dtype, "checkpoint_bytes": files, "peak_rss_bytes": peak,
           "peak_rss_over_checkpoint": round(peak / files, 2), "convert_seconds": round(wall, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
