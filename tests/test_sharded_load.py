"""Sharded streaming load (issue 18): two JAX processes load one HF checkpoint onto a mesh that spans them; each
reads only the safetensors byte ranges of its own shards, and the model equals a single-process load bit for bit."""

import os

import numpy as np
import pytest

pytest.importorskip("transformers")

from hf_helpers import TINY_MOE, build_hf_model, save_hf_model  # noqa: E402
from process_helpers import free_port, result  # noqa: E402
from process_helpers import launch as launch_worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "sharded_load_worker.py")


def launch(pid, n, port, directory):
    return launch_worker(WORKER, pid, n, port, directory,
                         xla_flags="--xla_force_host_platform_device_count=2" if n > 1 else "")


def test_two_processes_read_only_their_shards_and_load_the_same_model(tmp_path):
    # hidden and expert widths even, so fsdp=2 and tensor=2 split every matrix
    hf = build_hf_model(seed=3, **dict(TINY_MOE, moe_intermediate_size=24, hidden_size=48))
    directory = save_hf_model(hf, tmp_path / "hf")
    port = free_port()
    procs = [launch(pid, 2, port, directory) for pid in range(2)] + [launch(0, 1, 0, directory)]
    multi0, multi1, single = (result(p) for p in procs)
    assert (multi0["devices"], multi1["process"], single["devices"]) == (4, 1, 1)
    total = single["checkpoint_bytes"]
    print(f"\nbytes read: process 0 {multi0['bytes_read']:,}, process 1 {multi1['bytes_read']:,}, "
          f"one process {single['bytes_read']:,}, checkpoint files {total:,}")
    # one process reads every tensor once (the files also hold a JSON header)
    assert 0.95 * total < single["bytes_read"] <= total
    for r in (multi0, multi1):
        # a process reads its half of each matrix split over fsdp, plus the small replicated vectors
        assert r["bytes_read"] < 0.6 * total, r["bytes_read"]
    assert multi0["bytes_read"] + multi1["bytes_read"] >= single["bytes_read"]
    assert multi0["digest"] == multi1["digest"] == single["digest"]
    np.testing.assert_allclose(multi0["logits"], single["logits"], rtol=2e-5, atol=2e-5)
