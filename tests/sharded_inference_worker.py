"""Run in a subprocess with 8 simulated CPU devices (see test_sharded_inference.py): generation on a
data=2, tensor=2, expert=2 mesh against the same model on one device, and the collectives of the compiled
sharded decode step. Prints one line `RESULT {json}`."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.generate import _decode_step, _prefill, generate, on_mesh, stream_generate
from nemojax.model import NemotronH
from nemojax.sharding import MeshConfig, make_mesh, variable_spec
from nemojax.speculative import speculative_generate

CONFIGS = {
    "dense": ModelConfig.from_yaml("configs/tiny.yaml"),
    "moe": ModelConfig.from_yaml("configs/tiny_moe.yaml").replace(moe_impl="dense"),
}
PROMPTS = [[5, 17, 33, 2, 9], [7, 7, 100, 250, 31, 8, 64, 3, 12], [1, 2, 3], [300, 20, 45, 6, 77, 90, 11]]
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)


def runs(model, mesh):
    out = {"greedy": generate(model, PROMPTS, 12, mesh=mesh).tolist(),
           "sampled": generate(model, PROMPTS, 12, mesh=mesh, **SAMPLING).tolist(),
           "stream": np.stack(list(stream_generate(model, PROMPTS, 8, mesh=mesh))).tolist()}
    if model.mtp is not None:
        tokens, stats = speculative_generate(model, PROMPTS, 12, num_draft=2, mesh=mesh)
        out["speculative"] = tokens.tolist()
    return out


def decode_step_report(model, mesh) -> tuple[list[str], dict]:
    """(all-gathers in the compiled sharded decode step whose result has the full shape of a sharded weight,
    {cache array name: its partition spec} after a sharded prefill)."""
    mesh_axes = dict(mesh.shape)
    sharded = {tuple(v.get_value().shape) for path, v in nnx.state(model, nnx.Param).flat_state()
               if v.get_value().ndim >= 2 and any(variable_spec(path, v, mesh_axes))}
    context, ids, mask = on_mesh(model, mesh, np.ones((4, 6), np.int32), np.ones((4, 6), np.int32))
    graphdef, state = nnx.split(model)
    with context():
        _, cache = _prefill(graphdef, state, ids, mask, 16)
        text = _decode_step.lower(graphdef, state, jnp.zeros((4,), jnp.int32), cache).compile().as_text()
    cache_specs = {f"{type(c).__name__}.{name}": str(getattr(c, name).sharding.spec) for c in cache if c is not None
                   for name in c._fields}
    found = []
    for line in text.splitlines():
        if "all-gather(" not in line and "all-gather-start(" not in line:
            continue
        for dims in re.findall(r"[a-z]+\d*\[([\d,]+)\]", line.split("=", 1)[1].split("all-gather")[0]):
            if tuple(int(d) for d in dims.split(",")) in sharded:
                found.append(line.strip()[:200])
    return found, cache_specs


def main():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2, expert=2))
    result = {"devices": jax.device_count()}
    for name, cfg in CONFIGS.items():
        single = runs(NemotronH(cfg, nnx.Rngs(0)), None)
        model = NemotronH(cfg, nnx.Rngs(0))
        sharded = runs(model, mesh)
        gathers, cache_specs = decode_step_report(model, mesh)
        param_specs = sorted({str(v.get_value().sharding.spec) for _, v in nnx.state(model, nnx.Param).flat_state()})
        result[name] = {"single": single, "sharded": sharded, "weight_gathers": gathers, "cache_specs": cache_specs,
                        "param_specs": param_specs}
    # control: with FSDP the decode step must gather weights, so the check above can see gathers
    fsdp = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    result["fsdp_control_gathers"] = len(decode_step_report(NemotronH(CONFIGS["dense"], nnx.Rngs(0)), fsdp)[0])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
