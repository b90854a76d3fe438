"""MoE layer throughput: sparse expert dispatch ('capacity' grouped matmul, capacity factor 1.25, and 'ragged'
ragged_dot) vs the dense all-experts reference, at 8 and 64 experts on this machine; plus parameter and
per-token FLOP counts of the Nemotron 3 Nano and Super configs. Prints JSON lines.

    python benchmarks/moe.py [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
from common import emit  # noqa: E402
from flax import nnx  # noqa: E402

from nemojax.config import ModelConfig, RuntimeOptions  # noqa: E402
from nemojax.convert.hf import active_param_count, param_count  # noqa: E402
from nemojax.layers.moe import MoE  # noqa: E402


def time_layer(moe: MoE, x: jax.Array, impl: str, repeats: int) -> float:
    graphdef, state = nnx.split(moe)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, impl=impl))
    jax.block_until_ready(fn(state, x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, x))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Forward FLOPs per token: 2 x active matmul parameters (embedding lookup excluded), plus causal attention
    scores/values (2 * 2 * seq/2 * heads * head_dim per attention layer) and the SSD's state terms
    (~6 * heads * head_dim * state per Mamba layer)."""
    matmul = active_param_count(cfg) - cfg.vocab_size * cfg.hidden_size
    attn = cfg.pattern.count("*") * 2 * seq * cfg.num_attention_heads * cfg.head_dim
    ssd = cfg.pattern.count("M") * 6 * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size
    return 2 * matmul + attn + ssd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    emit({"bench": "moe", "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "tokens": args.tokens})
    for experts, k in ((8, 2), (64, 4)):
        cfg = ModelConfig(pattern="E", hidden_size=512, n_routed_experts=experts, num_experts_per_tok=k,
                          moe_intermediate_size=512, moe_shared_expert_intermediate_size=512,
                          runtime=RuntimeOptions(moe_capacity_factor=1.25), vocab_size=64)
        moe = MoE(cfg, nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (args.tokens // 512, 512, cfg.hidden_size))
        t = {impl: time_layer(moe, x, impl, args.repeats) for impl in ("dense", "capacity", "ragged")}
        emit({"experts": experts, "top_k": k, **{f"{i}_tok_s": round(args.tokens / s) for i, s in t.items()},
              "capacity_vs_dense": round(t["dense"] / t["capacity"], 2),
              "ragged_vs_dense": round(t["dense"] / t["ragged"], 2)})
    for name in ("nemotron3_nano_30b_a3b", "nemotron3_super_120b_a12b"):
        cfg = ModelConfig.from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml"))
        emit({"config": name, "total_params": param_count(cfg), "total_params_without_mtp": param_count(cfg, False),
              "active_params": active_param_count(cfg),
              "active_params_without_embeddings": active_param_count(cfg) - 2 * cfg.vocab_size * cfg.hidden_size,
              "fwd_gflops_per_token_at_8k": round(flops_per_token(cfg, 8192) / 1e9, 2)})


if __name__ == "__main__":
    main()
