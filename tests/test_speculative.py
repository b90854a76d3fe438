"""MTP speculative decoding gives exactly the plain greedy tokens and reports its acceptance rate."""

import numpy as np
import optax
import pytest
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.generate import generate
from nemojax.model import NemotronH
from nemojax.speculative import speculative_generate

CFG = ModelConfig.from_yaml("configs/tiny_moe.yaml").replace(vocab_size=64, hidden_size=64, chunk_size=16)


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_equals_greedy_random_model(num_draft):
    model = NemotronH(CFG, nnx.Rngs(0))
    prompts = [[1, 5, 9, 3, 7, 7, 2], [1, 8, 4]]
    ref = generate(model, prompts, max_new_tokens=20)
    out, stats = speculative_generate(model, prompts, max_new_tokens=20, num_draft=num_draft)
    np.testing.assert_array_equal(out, ref)
    assert stats.iterations >= 1 and 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.iterations <= 20


def test_trained_mtp_head_gets_drafts_accepted():
    """After a short training run on periodic sequences the MTP head's drafts are mostly accepted, and the
    output still equals plain greedy."""
    from nemojax.train.loss import lm_and_mtp_losses

    model = NemotronH(CFG, nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)

    @nnx.jit
    def step(model, opt, ids):
        def loss_fn(model):
            main, mtp = lm_and_mtp_losses(model, ids, depth=1)
            return main + 0.5 * mtp[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(120):
        start = rng.integers(3, 64, (16, 1))
        step(model, opt, np.asarray(3 + (start + 2 * np.arange(32)) % 61, np.int32))
    prompt = [list(3 + (10 + 2 * np.arange(12)) % 61)]
    ref = generate(model, prompt, max_new_tokens=24)
    out, stats = speculative_generate(model, prompt, max_new_tokens=24, num_draft=2)
    np.testing.assert_array_equal(out, ref)
    assert stats.acceptance_rate > 0.5, stats
    assert stats.iterations < 24 * 0.75          # fewer main-model passes than tokens


def test_needs_an_mtp_head():
    with pytest.raises(ValueError, match="MTP head"):
        speculative_generate(NemotronH(CFG.replace(num_nextn_predict_layers=0), nnx.Rngs(0)), [[1, 2]], 4)
