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


def test_cli_convert_on_a_mesh_writes_the_same_model(tmp_path):
    """`nemojax convert hf-to-orbax --mesh tensor=2` (two devices) reads the tensors into their shards and writes
    the same parameters as the conversion on one device."""
    import subprocess
    import sys

    from flax import nnx

    from nemojax.convert.orbax import load_orbax
    from nemojax.model import PERSISTENT

    directory = save_hf_model(build_hf_model(seed=5, **TINY_MOE), tmp_path / "hf")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, extra in (("sharded", ["--mesh", "tensor=2"]), ("single", [])):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
        proc = subprocess.run([sys.executable, "-m", "nemojax.cli", "convert", "hf-to-orbax", directory,
                               str(tmp_path / name), *extra], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
    sharded, single = (dict(nnx.state(load_orbax(str(tmp_path / n)), PERSISTENT).flat_state())
                       for n in ("sharded", "single"))
    assert sharded.keys() == single.keys()
    for path in single:
        np.testing.assert_array_equal(np.asarray(sharded[path].get_value()), np.asarray(single[path].get_value()),
                                      err_msg=str(path))


def test_repeated_loads_onto_a_cpu_mesh_do_not_deadlock(tmp_path):
    """Regression: restore_params checked each parameter for NaN/Inf with its own small program, which put many
    independent programs with an all-reduce in flight at once; XLA:CPU's in-process collectives deadlocked on
    that within ~20 loads onto a two-device mesh (the CI failure of `generate --mesh`). One program checks all."""
    import subprocess
    import sys

    from flax import nnx

    from nemojax import ModelConfig, NemotronH, save_orbax

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    save_orbax(NemotronH(ModelConfig.from_yaml(os.path.join(root, "configs/tiny.yaml")), nnx.Rngs(0)),
               str(tmp_path / "m"))
    code = ("import sys\nfrom nemojax import load_orbax\nfrom nemojax.sharding import make_mesh, parse_mesh\n"
            "mesh = make_mesh(parse_mesh('tensor=2'))\nfor _ in range(40):\n    load_orbax(sys.argv[1], mesh=mesh)\n"
            "print('loaded 40 times')\n")
    # a stuck collective aborts the process after 60 s instead of hanging the suite
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_cpu_collective_call_terminate_timeout_seconds=60")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "loaded 40 times" in proc.stdout, proc.stderr[-2000:]
