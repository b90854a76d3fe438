"""transformers 5.0-5.24 floored dt at time_step_min on its chunked path (every forward except a one-token step
that continues a state); NVIDIA's reference (mamba_ssm, vLLM) and transformers >= 5.25 never do. Both behaviours
are reachable through ModelConfig.runtime.dt_clamp, each checked against transformers' own forward with its
mixers' dt limit set to that behaviour (so the tests hold whichever transformers 5.x is installed)."""

import contextlib
import math

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
from hf_helpers import build_hf_model, hf_logits, random_ids, save_hf_model  # noqa: E402

from nemojax import load_hf  # noqa: E402


@pytest.fixture(scope="module")
def small_dt_model(tmp_path_factory):
    # dt_bias around -9 puts softplus(dt) (~1e-4) below time_step_min = 1e-2, where the two behaviours differ.
    # (transformers fails on a model without any attention layer, hence the '*')
    model = build_hf_model(seed=21, dt_bias_mean=-9.0, time_step_min=0.01, hybrid_override_pattern="MM*M")
    directory = save_hf_model(model, tmp_path_factory.mktemp("smalldt"))
    ids = random_ids(model.config.vocab_size, 2, 29)
    return model, directory, ids


@contextlib.contextmanager
def hf_dt_limit(model, floored: bool):
    """transformers' mixers with the dt limit of 5.0-5.24 ((time_step_min, inf), floored=True) or of NVIDIA's
    reference and 5.25+ (config.time_step_limit, here (0, inf)); restored afterwards."""
    mixers = [layer.mixer for layer in model.model.layers if hasattr(layer.mixer, "time_step_limit")]
    assert mixers, "transformers' NemotronH mixer no longer has time_step_limit: revisit this test"
    saved = [m.time_step_limit for m in mixers]
    limit = (model.config.time_step_min, math.inf) if floored else tuple(model.config.time_step_limit)
    for m in mixers:
        m.time_step_limit = limit
    try:
        yield
    finally:
        for m, old in zip(mixers, saved):
            m.time_step_limit = old


def test_hf_setting_matches_transformers_5_24(small_dt_model):
    model, directory, ids = small_dt_model
    with hf_dt_limit(model, floored=True):
        ref = hf_logits(model, ids)
    ours = np.asarray(load_hf(directory, dt_clamp="hf")(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_none_setting_matches_the_reference_behaviour(small_dt_model):
    model, directory, ids = small_dt_model
    with hf_dt_limit(model, floored=True):
        clamped = hf_logits(model, ids)
    with hf_dt_limit(model, floored=False):
        unclamped = hf_logits(model, ids)
    ours = np.asarray(load_hf(directory)(jnp.asarray(ids)))        # the default is "none"
    scale = np.abs(unclamped).max()
    assert np.abs(ours - unclamped).max() <= 1e-4 * scale
    # and the flag matters here: the clamped and unclamped forwards really differ
    assert np.abs(clamped - unclamped).max() > 1e-3 * scale


def test_one_token_prompt_follows_transformers(small_dt_model):
    """A one-token forward or prompt has no state to continue, so transformers 5.0-5.24 took its clamping
    path: the TRAIN and PREFILL modes clamp whatever the length; only DECODE steps (and speculative VERIFY) do
    not. At one token the clamp moves the logits by ~2.5e-5 of their scale, so this checks at 2e-6 (fp32 parity
    is ~5e-7)."""
    from nemojax.layers.common import Mode

    model, directory, ids = small_dt_model
    ours, unclamped = load_hf(directory, dt_clamp="hf"), load_hf(directory, dt_clamp="none")
    one = jnp.asarray(ids[:, :1])
    with hf_dt_limit(model, floored=True):
        ref = hf_logits(model, ids[:, :1])
    scale = np.abs(ref).max()
    prefill = ours.logits(ours.forward(one, cache=ours.init_cache(2, 4), mode=Mode.PREFILL)[0])
    for got in (ours(one), prefill):
        assert np.abs(np.asarray(got) - ref).max() <= 2e-6 * scale
    assert np.abs(np.asarray(unclamped(one)) - ref).max() > 1e-5 * scale     # the clamp is visible here
