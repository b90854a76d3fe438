"""Every variable and cache array declares logical axes that map to valid mesh specs (and an undeclared one is
refused); sharded training on 8 simulated CPU devices equals the 1-device run; checkpoints move between meshes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.quant.pack import PackSpec, pack_model
from nemojax.sharding import RULES, MeshConfig, logical_to_spec, make_mesh, mesh_shape, shard_model, variable_spec

TINY = ModelConfig.from_yaml("configs/tiny.yaml")
TINY_MOE = ModelConfig.from_yaml("configs/tiny_moe.yaml")
CONFIG_KINDS = {   # every kind of parameter: dense (with every bias and stability norm), MoE + MTP, LatentMoE
    "dense": TINY.replace(mamba_proj_bias=True, mlp_bias=True, attn_qk_norm=True, tie_word_embeddings=True),
    "dense_qkv_norm_mtp": TINY.replace(attn_qkv_norm=True, num_nextn_predict_layers=2, mtp_pattern="*-"),
    "moe_mtp": TINY_MOE,
    "latent_moe": TINY_MOE.replace(moe_latent_size=48, mlp_bias=True),
}
MESH = {"data": 2, "fsdp": 2, "tensor": 2, "expert": 2}


def check_variables(obj, mesh_axes) -> int:
    """Every variable of obj declares one known logical axis per dimension and maps to a valid spec."""
    count = 0
    for path, var in nnx.state(obj).flat_state():
        value, axes = var.get_value(), var.get_metadata().get("logical_axes")
        name = ".".join(map(str, path))
        if axes is None:                            # only scalars (optimizer counters) may have none
            assert value.ndim == 0, name
            continue
        assert len(axes) == value.ndim, (name, axes, value.shape)
        assert all(a is None or a in RULES for a in axes), (name, axes)
        spec = variable_spec(path, var, mesh_axes)   # raises on a mesh axis used twice
        for dim, entry in zip(value.shape, spec):
            size = 1 if entry is None else np.prod([mesh_axes[a] for a in ((entry,) if isinstance(entry, str)
                                                                             else entry)])
            assert dim % size == 0, (name, spec)
        count += 1
    return count


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_every_variable_declares_logical_axes(kind):
    cfg = CONFIG_KINDS[kind]
    model = nnx.eval_shape(lambda: NemotronH(cfg, nnx.Rngs(0)))
    assert check_variables(model, MESH) == len(nnx.state(model).flat_state())
    opt = nnx.eval_shape(lambda: nnx.Optimizer(NemotronH(cfg, nnx.Rngs(0)), optax.adamw(1e-3), wrt=nnx.Param))
    assert check_variables(opt, MESH) == 2 * len(nnx.state(model, nnx.Param).flat_state())   # Adam mu and nu
    packed = NemotronH(cfg.replace(vocab_size=64, hidden_size=64), nnx.Rngs(0))
    pack_model(packed, PackSpec("int4", group=32))
    check_variables(packed, MESH)


def test_inference_caches_declare_their_logical_axes():
    cfg = TINY_MOE.replace(pattern="M*-E")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NemotronH(cfg, nnx.Rngs(0))))
    cache = jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(8, 32))
    kinds = set()
    for entry in cache:
        if entry is None:
            continue
        kinds.add(type(entry).__name__)
        for field in entry._fields:
            axes = entry.LOGICAL_AXES[field]            # one name per dimension (logical_to_spec checks), batch first
            spec = logical_to_spec(axes, getattr(entry, field).shape, MESH)
            assert not axes or (axes[0] == "batch" and spec[0] == ("data", "fsdp", "expert")), (field, spec)
    assert kinds == {"MambaState", "KVCache"}


def test_published_latent_moe_config_shards_on_a_pod_mesh():
    cfg = ModelConfig.from_yaml("configs/nemotron3_super_120b_a12b.yaml")
    model = nnx.eval_shape(lambda: NemotronH(cfg, nnx.Rngs(0)))
    check_variables(model, {"data": 1, "fsdp": 16, "tensor": 4, "expert": 8})
    up = model.layers[1].mixer.up_proj
    assert variable_spec((), up, {"fsdp": 16, "tensor": 4, "expert": 8}) == P("expert", "fsdp", "tensor")


def test_specs_follow_the_rules_and_refuse_undeclared_parameters():
    assert logical_to_spec(("embed", "mamba_heads"), (64, 128), MESH) == P("fsdp", "tensor")
    assert logical_to_spec(("mamba_heads", "embed"), (128, 64), MESH) == P("tensor", "fsdp")
    assert logical_to_spec(("norm",), (64,), MESH) == P(None)
    assert logical_to_spec(("batch", "seq", "vocab"), (8, 4, 64), MESH) == P(("data", "fsdp", "expert"), None,
                                                                               "tensor")
    assert logical_to_spec(("embed", "heads"), (64, 6), {"fsdp": 2, "tensor": 4}) == P("fsdp", None)  # 6 % 4
    with pytest.raises(ValueError, match="two dimensions"):
        logical_to_spec(("embed", "embed"), (64, 64), MESH)
    with pytest.raises(ValueError, match="no entry in sharding.RULES"):
        logical_to_spec(("embedd",), (64,), MESH)

    class Undeclared(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)))

    with pytest.raises(ValueError, match="w .4, 4. declares no logical axes"):
        shard_model(Undeclared(), make_mesh())


def test_mesh_shape_fills_and_validates():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="does not fit"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


@pytest.mark.slow
def test_sharded_training_matches_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "sharding_worker.py"), str(tmp_path / "ck")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["devices"] == 8
    assert result["in_proj_x_spec"] == ["fsdp", "tensor"]
    assert result["expert_up_spec"] == ["None", "fsdp", "tensor"]       # expert axis has size 1 here
    # sequence parallelism: the residual stream is pinned to batch over data x fsdp and positions over tensor
    # after the embeddings, each mixer's output and each block; each mixer's input and the final hidden states
    # are whole sequences; logits are split over the vocabulary
    residual, whole = '{"data", "fsdp"}, {"tensor"}, {}', '{"data", "fsdp"}, {}, {}'
    assert result["constraints"] == ([residual] + [whole, residual, residual] * result["num_blocks"]
                                     + [whole, '{"data", "fsdp"}, {}, {"tensor"}'])
    assert result["loss_diff"] < 1e-5 and result["param_diff"] < 1e-5, result
    assert result["restored_spec"] == ["fsdp", "tensor"]
    assert result["resumed_loss_diff"] < 1e-5, result
    assert result["scan_loss_diff"] < 1e-5 and result["scan_param_diff"] < 1e-5, result
    for precision in ("aqt_int8", "nvfp4"):
        # a reduction-order difference can move an amax by an ulp and flip a rounding in some block, which
        # changes the loss by about one quantization step's worth (CI saw 1.04e-4 at a 1e-4 bound)
        assert result[f"{precision}_loss_diff"] < 3e-4, result
        assert result[f"{precision}_vs_fp32"] > 1e-6, result         # it did quantize
