"""Helpers shared by the benchmarks: a ~120M dense Nemotron-H config, per-framework worker processes and
interleaved timing.

Each framework runs in its own worker process: building a torch model in the same process as XLA measurably
slowed XLA's CPU forward (4.0 s -> 4.5-5.3 s at 4096 tokens, allocator state), which no user of one framework
sees. The parent alternates timed calls between the workers, one at a time, so they never share the cores
and slow drifts of a noisy machine hit both sides alike."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

# ~123M parameters with the 8B model's layer mix (Mamba : attention : MLP = 24 : 4 : 24, here 7 : 2 : 7).
BENCH_HF_CONFIG = dict(
    vocab_size=32768, hidden_size=768, hybrid_override_pattern="M-M-M*-M-M-M*-M-", num_attention_heads=12,
    num_key_value_heads=4, head_dim=64, intermediate_size=3072, mamba_num_heads=24, mamba_head_dim=64,
    ssm_state_size=128, n_groups=8, chunk_size=128, layer_norm_epsilon=1e-5,
)


@contextlib.contextmanager
def bench_checkpoint():
    """A temporary directory holding a randomly initialised (seed 0) HF checkpoint of BENCH_HF_CONFIG, which
    both frameworks' workers load: same weights on both sides."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    with tempfile.TemporaryDirectory() as ckpt:
        torch.manual_seed(0)
        NemotronHForCausalLM(NemotronHConfig(**BENCH_HF_CONFIG)).save_pretrained(ckpt)
        yield ckpt


def _serve(setup, args, conn, tuned_malloc):
    """Worker loop: setup(*args) returns {task_name: fn() -> result}; each request names a task."""
    os.environ["NEMOJAX_HOST_MALLOC"] = "1" if tuned_malloc else "0"     # before anything imports nemojax
    from nemojax.host_allocator import tune_host_allocator

    tune_host_allocator(force=True)
    tasks = setup(*args)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, timed = msg
        t0 = time.perf_counter()
        result = tasks[name]()
        elapsed = time.perf_counter() - t0
        conn.send(elapsed if timed else result)


class Worker:
    """A spawned process running `setup(*args)` (a module-level function) and answering task requests.

    tuned_malloc: the worker applies nemojax.host_allocator's glibc settings before anything allocates, as
    `import nemojax` does on CPU; False leaves glibc's defaults. Benchmarks give every framework's worker the
    same setting (torch gains from it too)."""

    def __init__(self, setup, *args, tuned_malloc: bool = True):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(setup, args, child, tuned_malloc), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("benchmark worker failed to start")

    def result(self, task: str):
        self.conn.send((task, False))
        return self.conn.recv()

    def time(self, task: str) -> float:
        self.conn.send((task, True))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=30)


def interleaved_medians(workers: dict, task: str, repeats: int) -> dict:
    """Warm each worker up on `task`, then alternate timed runs; median seconds per worker."""
    for w in workers.values():
        w.time(task)
    times = {name: [] for name in workers}
    for _ in range(repeats):
        for name, w in workers.items():
            times[name].append(w.time(task))
    return {name: statistics.median(ts) for name, ts in times.items()}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn() after one warm-up call (fn must block until done)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
