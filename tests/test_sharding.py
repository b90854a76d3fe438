"""Sharded training on 8 simulated CPU devices equals the 1-device run; checkpoints move between meshes."""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from nemojax.sharding import MeshConfig, fit_spec, logical_spec, mesh_shape


def test_mesh_shape_fills_and_validates():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="does not fit"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


def test_specs_by_parameter_name():
    assert logical_spec(("layers", 0, "mixer", "in_proj_x", "kernel"), (64, 128)) == ("fsdp", "tensor")
    assert logical_spec(("layers", 0, "mixer", "out_proj", "kernel"), (128, 64)) == ("tensor", "fsdp")
    assert logical_spec(("layers", 0, "mixer", "A_log"), (8,)) == ("tensor",)
    assert logical_spec(("layers", 0, "mixer", "conv_x", "weight"), (4, 128)) == (None, "tensor")
    assert logical_spec(("layers", 0, "norm", "weight"), (64,)) == (None,)
    assert logical_spec(("layers", 1, "mixer", "up_proj"), (8, 64, 32)) == ("expert", "fsdp", "tensor")

    class FakeMesh:
        shape = {"fsdp": 2, "tensor": 4}
    assert fit_spec(("fsdp", "tensor"), (64, 6), FakeMesh()) == P("fsdp", None)   # 6 % 4 != 0: replicate


@pytest.mark.slow
def test_sharded_training_matches_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "sharding_worker.py"), str(tmp_path / "ck")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["devices"] == 8
    assert result["in_proj_x_spec"] == ["fsdp", "tensor"]
    assert result["expert_up_spec"] == ["None", "fsdp", "tensor"]       # expert axis has size 1 here
    # residual stream pinned to batch over data x fsdp after the embeddings and every block; logits add vocab
    residual = '{"data", "fsdp"}, {}, {}'
    assert result["constraints"] == [residual] * (result["num_blocks"] + 1) + ['{"data", "fsdp"}, {}, {"tensor"}']
    assert result["loss_diff"] < 1e-5 and result["param_diff"] < 1e-5, result
    assert result["restored_spec"] == ["fsdp", "tensor"]
    assert result["resumed_loss_diff"] < 1e-5, result
    for precision in ("aqt_int8", "nvfp4"):
        assert result[f"{precision}_loss_diff"] < 1e-4, result
        assert result[f"{precision}_vs_fp32"] > 1e-6, result         # it did quantize
