"""One process of a sharded HF load (see test_sharded_load.py). argv: process_id num_processes port model_dir.
With two processes (2 CPU devices each) the model is loaded onto a data=1,fsdp=2,tensor=2 mesh whose fsdp axis
spans the processes; with one, onto its default device. Prints RESULT {bytes read, parameter digest, logits}."""

import hashlib
import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemojax.convert.hf import load_hf
from nemojax.distributed import initialize
from nemojax.model import PERSISTENT
from nemojax.sharding import MeshConfig, make_mesh


def main(pid: int, n: int, port: int, directory: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    mesh = None
    if n > 1:
        initialize("on", coordinator_address=f"localhost:{port}", num_processes=n, process_id=pid)
        mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    stats = {}
    model = load_hf(directory, mesh=mesh, stats=stats)
    digest = hashlib.sha256()
    for path, var in sorted(nnx.state(model, PERSISTENT).flat_state(), key=lambda pv: str(pv[0])):
        value = var.get_value()
        full = multihost_utils.process_allgather(value, tiled=True) if n > 1 else np.asarray(value)
        digest.update(str(path).encode() + np.ascontiguousarray(full).tobytes())
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 8)).astype(np.int32)
    if mesh is not None:
        with jax.set_mesh(mesh):
            ids_global = jax.make_array_from_callback(ids.shape, NamedSharding(mesh, P()), lambda i: ids[i])
            logits = multihost_utils.process_allgather(jax.jit(lambda m, x: m(x))(model, ids_global), tiled=True)
    else:
        logits = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
    out = {"process": jax.process_index(), "devices": jax.device_count(), "digest": digest.hexdigest(),
           "logits": np.asarray(logits).ravel().tolist(), **stats}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
