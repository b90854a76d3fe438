"""The structure docs/architecture.md describes: the package layering ("What may import what"), checked on the
source (each part of nemojax imports only the parts below it, the core imports nothing inside functions,
training reaches into layers/ only for the forward mode and the variable types it reads), and a new layer kind
added as its mixer plus one row of the pattern-character table."""

import ast
import pathlib
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import LAYER_KINDS, LayerKind, ModelConfig
from nemojax.layers.common import Mode, linear
from nemojax.model import NemotronH
from nemojax.sharding import make_mesh, shard_model

ROOT = pathlib.Path(__file__).resolve().parents[1] / "nemojax"
ALLOWED = {     # part of nemojax -> the parts it may import (besides itself); pallas_kernels counts as a part
    "config": set(), "sharding": set(), "host_allocator": set(), "tokenizer": set(), "distributed": set(),
    "fs": set(),
    "ssd": {"pallas_kernels"},
    "layers": {"config", "sharding", "ssd"},
    "model": {"config", "sharding", "layers"},
    "generate": {"config", "layers", "model", "sharding"},
    "speculative": {"config", "layers", "model", "generate", "sharding"},
    "quant": {"config", "layers", "model", "pallas_kernels", "compress"},
    "compress": {"config", "layers", "model", "evaluation", "convert", "train"},   # search.py runs distillations
    "convert": {"config", "model", "quant", "fs", "sharding"},
    "train": {"config", "sharding", "layers", "model", "quant", "convert", "tokenizer", "fs", "compress"},
    "aot": {"config", "sharding", "model", "generate", "quant", "train", "pallas_kernels"},
    "evaluation": {"model"},
    "chat": {"generate", "model"},
    "lm_eval_adapter": {"convert", "fs", "generate", "tokenizer"},
}
CORE = ("config", "sharding", "ssd", "layers", "model")       # no imports inside functions
TRAIN_FROM_LAYERS = {"Mode", "ExpertBias", "RouterLoad", "AuxLoss"}


def imports(path: pathlib.Path):
    """(imported part, imported names, inside a function?) for every nemojax / pallas_kernels import."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "nemojax":
            modules = [(f"nemojax.{a.name}", ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "", tuple(a.name for a in node.names))]
        else:
            continue
        for module, names in modules:
            parts = module.split(".")
            if parts[0] == "pallas_kernels" or (parts[0] == "nemojax" and len(parts) > 1):
                yield (parts[0] if parts[0] == "pallas_kernels" else parts[1]), module, names, id(node) in inner


def test_each_part_imports_only_the_parts_below_it():
    problems = []
    for path in ROOT.rglob("*.py"):
        part = path.relative_to(ROOT).with_suffix("").parts[0]
        if part not in ALLOWED:            # cli and the package __init__ may import anything
            continue
        for target, module, names, in_function in imports(path):
            if target != part and target not in ALLOWED[part]:
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
            if part in CORE and in_function:
                problems.append(f"{path.relative_to(ROOT)} imports {module} inside a function")
            if part == "train" and target == "layers" and not set(names) <= TRAIN_FROM_LAYERS:
                problems.append(f"{path.relative_to(ROOT)} imports {set(names) - TRAIN_FROM_LAYERS} from {module}")
    assert not problems, "\n".join(problems)


class ShiftCache(NamedTuple):
    last: jax.Array                      # [batch, 1, hidden]: the previous token's input

    LOGICAL_AXES = {"last": ("batch", None, "act_embed")}


class ShiftMixer(nnx.Module):
    """A toy stateful layer kind, y_t = (x_t + x_{t-1}) @ W, written against the mixer interface only."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.proj = linear(cfg, cfg.hidden_size, cfg.hidden_size, rngs, ("embed", "mlp"))

    def init_cache(self, batch, max_len, dtype):
        return ShiftCache(jnp.zeros((batch, 1, self.proj.in_features), dtype))

    def __call__(self, x, *, mask=None, cache=None, mode=Mode.TRAIN):
        prev = jnp.zeros_like(x[:, :1]) if cache is None else cache.last.astype(x.dtype)
        y = self.proj(x + jnp.concatenate([prev, x[:, :-1]], axis=1))
        return y, None if mode is Mode.TRAIN else ShiftCache(x[:, -1:])


def test_a_new_layer_kind_is_its_mixer_and_one_table_row(monkeypatch):
    """With only a row in LAYER_KINDS, a new kind builds, shards by its declared axes, and its cached prefill +
    decode equal the whole-sequence forward; every block gets its profile scope in the compiled program."""
    monkeypatch.setitem(LAYER_KINDS, "S", LayerKind("shift", ("shift",), f"{__name__}:ShiftMixer"))
    cfg = ModelConfig.from_yaml("configs/tiny.yaml").replace(pattern="MS*S-")
    model = NemotronH(cfg, nnx.Rngs(0))
    shard_model(model, make_mesh())
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    full = np.asarray(model(ids))
    hidden, cache = model.forward(ids[:, :5], cache=model.init_cache(2, 12), mode=Mode.PREFILL)
    got = [model.logits(hidden)]
    for t in range(5, 12):
        hidden, cache = model.forward(ids[:, t:t + 1], cache=cache, mode=Mode.DECODE)
        got.append(model.logits(hidden))
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-4 * np.abs(full).max())
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, ids).compile().as_text()
    scopes = set(re.findall(r'op_name="[^"]*?(layer\d+_[^/"]*)', hlo))
    assert scopes == {"layer0_Mamba-2", "layer1_shift", "layer2_attention", "layer3_shift", "layer4_MLP"}


def test_every_pallas_call_declares_its_cost():
    """XLA's cost model and profiles account a kernel only through its pl.CostEstimate."""
    calls = []
    for path in (ROOT.parent / "pallas_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "pallas_call":
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 3, calls
    assert all("cost_estimate" in keywords for _, _, keywords in calls), calls
