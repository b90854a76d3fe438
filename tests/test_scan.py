"""runtime.scan_layers (issue 18): the TRAIN forward runs repeated units of the layer pattern as one lax.scan
each. The scanned step must be the same function as the unrolled one: equal loss, gradients and MoE router
statistics (exactly, in float32), also under remat and with the quantized recipes whose stochastic rounding is
keyed per layer; the plan must cover the pattern with units that really repeat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ModelConfig, resolve_config
from nemojax.layers.block import block_key, scan_plan
from nemojax.model import NemotronH
from nemojax.quant.recipe import apply_precision, rounding_key
from nemojax.train.loss import lm_and_mtp_losses, moe_aux_loss

TINY = ModelConfig.from_yaml("configs/tiny.yaml").replace(pattern="M-M-*-M-M-*-M")
TINY_MOE = ModelConfig.from_yaml("configs/tiny_moe.yaml").replace(pattern="MEMEM*EMEME*E", moe_aux_loss_coef=0.01)
TOKENS = jax.random.randint(jax.random.key(1), (2, 65), 0, 320)


def expand(plan, keys):
    """The key sequence a plan stands for, checking that every scanned unit really repeats."""
    out = []
    for start, unit, repeats in plan:
        segment = keys[start:start + unit * repeats]
        assert len(segment) == unit * repeats
        if repeats > 1:
            assert all(segment[q * unit:(q + 1) * unit] == segment[:unit] for q in range(repeats)), plan
        out.extend(segment)
    return out


@pytest.mark.parametrize("keys, expected", [
    ("ABABAB", [(0, 2, 3)]),
    ("AAAB", [(0, 1, 3), (3, 1, 1)]),
    ("ABC", [(0, 3, 1)]),                                  # nothing repeats: one unrolled run
    ("XABABABY", [(0, 1, 1), (1, 2, 3), (7, 1, 1)]),
    ("", []),
])
def test_scan_plan_small_cases(keys, expected):
    assert scan_plan(list(keys)) == expected


@pytest.mark.parametrize("name", ["nemotron_h_56b", "nemotron_h_47b", "nano_v2_9b", "nemotron3_super_120b_a12b"])
def test_scan_plan_covers_published_patterns_and_compiles_fewer_blocks(name):
    pattern = ModelConfig.from_yaml(resolve_config(name)).pattern
    keys = list(pattern)
    plan = scan_plan(keys)
    assert expand(plan, keys) == keys
    starts = [s for s, _, _ in plan]
    assert starts == sorted(starts) and starts[0] == 0
    compiled = sum(unit for _, unit, _ in plan)
    assert compiled <= len(keys) // 2, (compiled, len(keys))
    if name == "nemotron_h_56b":     # "M-M-M-M*-M-" x 10 + "M-" x 4: 118 blocks, 13 traced
        assert [(pattern[s:s + u], r) for s, u, r in plan] == [("M-M-M-M*-M-", 10), ("M-", 4)]


def test_block_keys_ignore_layer_names_and_rounding_ids_but_not_structure():
    model = NemotronH(TINY_MOE, nnx.Rngs(0))
    apply_precision(model, "nvfp4", straight_through=False)
    keys = [block_key(b) for b in model.layers]
    kinds = TINY_MOE.pattern
    for i, j in [(0, 2), (1, 3), (5, 11)]:        # same kind: same key, although scopes and uids differ
        assert kinds[i] == kinds[j] and keys[i] == keys[j]
    for i, j in [(0, 1), (1, 5)]:                 # other kinds
        assert keys[i] != keys[j]
    wider = NemotronH(TINY_MOE.replace(moe_intermediate_size=64), nnx.Rngs(0))
    assert block_key(wider.layers[1]) != block_key(NemotronH(TINY_MOE, nnx.Rngs(0)).layers[1])


def loss_and_grads(cfg: ModelConfig, precision: str = "bf16"):
    model = NemotronH(cfg, nnx.Rngs(0))
    apply_precision(model, precision)

    def loss(m):
        return lm_and_mtp_losses(m, TOKENS)[0] + moe_aux_loss(m)

    @nnx.jit
    def step(m):
        with rounding_key(jax.random.key(3)):
            return nnx.value_and_grad(loss)(m)

    value, grads = step(model)
    written = nnx.state(model, nnx.Not(nnx.Param))          # router load and aux loss of every MoE layer
    return value, grads, written


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("cfg, remat, precision", [
    (TINY_MOE, "none", "bf16"),
    (TINY_MOE, "block", "nvfp4"),       # stochastic rounding keyed per layer: the scan shifts the ids
    (TINY, "dots", "aqt_int4"),
], ids=["moe", "moe_remat_nvfp4", "dense_aqt_dots"])
def test_scanned_train_forward_equals_unrolled_exactly(cfg, remat, precision):
    cfg = cfg.replace(remat=remat)
    model = NemotronH(cfg, nnx.Rngs(0))
    assert any(r > 1 for _, _, r in scan_plan([block_key(b) for b in model.layers]))
    unrolled = loss_and_grads(cfg.replace(scan_layers=False), precision)
    scanned = loss_and_grads(cfg.replace(scan_layers=True), precision)
    assert float(unrolled[0]) == float(scanned[0])
    assert_trees_equal(unrolled[1], scanned[1])
    assert_trees_equal(unrolled[2], scanned[2])
    if cfg is TINY_MOE:
        assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(scanned[2]))) > 0


def test_scanned_bf16_is_as_close_to_float32_as_unrolled_bf16():
    """In bfloat16 XLA fuses a loop body differently from unrolled code, so roundings differ and exact equality
    is not expected; scanning must not move the gradients further from the float32 ones than bf16 itself does."""
    bf16 = TINY.replace(dtype="bfloat16")
    reference = loss_and_grads(TINY)[1]
    unrolled = loss_and_grads(bf16)[1]
    scanned = loss_and_grads(bf16.replace(scan_layers=True))[1]

    def relative(a, b):
        diff = sum(float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        return (diff / sum(float(jnp.sum(y.astype(jnp.float32) ** 2)) for y in jax.tree.leaves(b))) ** 0.5

    assert 0 < relative(unrolled, reference) < 0.05
    assert relative(scanned, reference) < 1.5 * relative(unrolled, reference)
    assert relative(scanned, unrolled) < 2 * relative(unrolled, reference)
