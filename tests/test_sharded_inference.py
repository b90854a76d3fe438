"""Sharded inference on 8 simulated CPU devices (a data=2, tensor=2, expert=2 mesh; sharded_inference_worker.py):
greedy, seeded-sampling, streaming and speculative tokens equal the single-device ones for ragged batches of
a dense and an MoE model; the cache is sharded by its logical axes; the compiled decode step gathers no weight.
Chunked prefill (one device) equals one-shot prefill."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.generate import _prefill, chunk_pad, generate, prepare
from nemojax.model import NemotronH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_inference_worker.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_sharded_generation_equals_single_device(report, kind):
    assert report["devices"] == 8
    single, sharded = report[kind]["single"], report[kind]["sharded"]
    expected = ["greedy", "sampled", "stream"] + (["speculative"] if kind == "moe" else [])
    assert sorted(single) == sorted(sharded) == sorted(expected)
    for name in single:
        assert sharded[name] == single[name], name
    assert single["greedy"] != single["sampled"]                 # sampling really sampled


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_weights_and_caches_stay_sharded_and_decode_gathers_no_weight(report, kind):
    r = report[kind]
    assert r["weight_gathers"] == [], r["weight_gathers"]
    assert report["fsdp_control_gathers"] > 0                    # the check finds FSDP's weight gathers
    assert any("tensor" in s for s in r["param_specs"])
    if kind == "moe":
        assert any("expert" in s for s in r["param_specs"])
    caches = r["cache_specs"]
    # batch over data x expert (the expert axis is data parallel outside the MoE layers)
    assert caches["KVCache.k"] == "P(('data', 'expert'), 'tensor')"           # [batch, kv_heads, seq, head_dim]
    assert caches["MambaState.ssm"] == "P(('data', 'expert'), 'tensor')"      # [batch, mamba_heads, head_dim, state]
    assert caches["MambaState.conv_x"] == "P(('data', 'expert'), None, 'tensor')"


def test_chunked_prefill_equals_one_shot():
    """Ragged prompts up to 150 tokens in chunks of 32 and 64 (several SSD chunks of 16, left padding longer than a
    chunk): last-position logits and the continuation match one-shot prefill."""
    cfg = ModelConfig.from_yaml("configs/tiny.yaml").replace(chunk_size=16)
    model = NemotronH(cfg, nnx.Rngs(1))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 320, n)) for n in (150, 37, 96, 5)]
    ids, mask, pad = prepare(model, prompts, max_new_tokens=8)
    graphdef, state = nnx.split(model)
    one_shot, _ = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), ids.shape[1] + 8)
    for chunk in (32, 64):
        cids, cmask = chunk_pad(ids, mask, chunk, pad)
        assert cids.shape[1] % chunk == 0 and cids.shape[1] > ids.shape[1]
        chunked, _ = _prefill(graphdef, state, jnp.asarray(cids), jnp.asarray(cmask), cids.shape[1] + 8, chunk)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(one_shot), rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(generate(model, prompts, 8, prefill_chunk=chunk),
                                      generate(model, prompts, 8, prefill_chunk=None))
    with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
        generate(model, prompts, 2, prefill_chunk=0)


def test_mesh_flag_parses_and_refuses_bad_axes():
    from nemojax.sharding import MeshConfig, parse_mesh

    assert parse_mesh("data=2,tensor=2,expert=2") == MeshConfig(data=2, fsdp=1, tensor=2, expert=2)
    assert parse_mesh("tensor=-1") == MeshConfig(data=1, fsdp=1, tensor=-1, expert=1)
    for bad in ("model=2", "tensor", "tensor=x"):
        with pytest.raises(ValueError, match="expected comma-separated AXIS=SIZE"):
            parse_mesh(bad)


def test_cli_generate_on_a_mesh_and_in_chunks_prints_the_same_text(tmp_path):
    from nemojax import save_orbax

    save_orbax(NemotronH(ModelConfig.from_yaml("configs/tiny.yaml"), nnx.Rngs(0)), str(tmp_path / "m"))

    def run(*extra):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-m", "nemojax.cli", "generate", "--model", str(tmp_path / "m"),
                               "--prompt", "def main(", "--max-new-tokens", "12", "--ignore-eos", *extra], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc
    sharded, single = run("--mesh", "tensor=2", "--prefill-chunk", "4"), run("--prefill-chunk", "0")
    assert "sharded over a mesh of {'data': 1, 'fsdp': 1, 'tensor': 2, 'expert': 1}" in sharded.stderr
    assert sharded.stdout == single.stdout and len(single.stdout) > len("def main(")
