"""Generation: greedy parity with transformers' generate (dense and MoE, batch 1 and a ragged batch),
incremental decode vs full forward, cache sizes, sampling controls, streaming and the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.generate import generate, left_pad, sample, stream_generate
from nemojax.layers.common import Mode
from nemojax.model import NemotronH, abstract_model, cache_bytes

TINY = ModelConfig.from_yaml("configs/tiny.yaml")


@pytest.fixture(scope="module", params=["dense", "moe"])
def hf_case(request, tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_helpers import TINY_MOE, build_hf_model, random_ids, save_hf_model

    from nemojax import load_hf

    overrides = TINY_MOE if request.param == "moe" else {}
    hf = build_hf_model(seed=60, **overrides)
    hf.generation_config.eos_token_id = None      # random weights: never stop early
    model = load_hf(save_hf_model(hf, tmp_path_factory.mktemp(request.param)))
    prompts = [list(random_ids(97, 1, n, seed=n)[0]) for n in (11, 4, 8)]
    return hf, model, prompts


def hf_greedy(hf, ids, mask, new):
    import torch

    with torch.no_grad():
        return hf.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                           max_new_tokens=new, do_sample=False, pad_token_id=0).numpy()


def test_greedy_matches_transformers_batch1(hf_case):
    hf, model, prompts = hf_case
    ids, mask = left_pad(prompts[:1])
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=32), hf_greedy(hf, ids, mask, 32))


def test_greedy_matches_transformers_ragged_batch(hf_case):
    hf, model, prompts = hf_case
    ids, mask = left_pad(prompts)
    ours = generate(model, prompts, max_new_tokens=32)
    np.testing.assert_array_equal(ours, hf_greedy(hf, ids, mask, 32))
    # and each row equals its own unpadded generation
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(ours[i, -32:], generate(model, [p], max_new_tokens=32)[0, -32:])


@pytest.mark.parametrize("pattern", ["M*-M", "ME*E"])
def test_incremental_decode_equals_full_forward(pattern):
    """PREFILL of a prompt, EXTEND by a further chunk, then one-token DECODE steps give the full forward's logits."""
    cfg = TINY.replace(pattern=pattern, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, chunk_size=16)
    model = NemotronH(cfg, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)
    full = np.asarray(model(ids))
    hidden, cache = model.forward(ids[:, :13], cache=model.init_cache(2, 40), mode=Mode.PREFILL)
    got = [np.asarray(model.logits(hidden))]
    hidden, cache = model.forward(ids[:, 13:33], cache=cache, mode=Mode.EXTEND)       # two SSD chunks, from a state
    got.append(np.asarray(model.logits(hidden)))

    @nnx.jit
    def step(m, tok, c):
        hidden, c = m.forward(tok, cache=c, mode=Mode.DECODE)
        return m.logits(hidden), c

    for t in range(33, 40):
        logits, cache = step(model, ids[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    scale = np.abs(full).max()
    assert np.abs(got - full).max() <= 1e-4 * scale, np.abs(got - full).max() / scale


def test_ragged_prompts_prefill_extend_and_decode_like_each_row_alone():
    """Left-padded prompts of different lengths (PREFILL with a mask), then an EXTEND chunk and DECODE steps: each
    row's logits equal its own unpadded full forward."""
    cfg = TINY.replace(pattern="M*EM", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, chunk_size=8)
    model = NemotronH(cfg, nnx.Rngs(3))
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (9, 4)]
    more = rng.integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    ids, mask = left_pad(prompts)
    hidden, cache = model.forward(jnp.asarray(ids), mask=jnp.asarray(mask), cache=model.init_cache(2, 24),
                                  mode=Mode.PREFILL)
    got = [model.logits(hidden[:, -1:])]
    hidden, cache = model.forward(jnp.asarray(more[:, :10]), cache=cache, mode=Mode.EXTEND)
    got.append(model.logits(hidden))
    for t in (10, 11):
        hidden, cache = model.forward(jnp.asarray(more[:, t:t + 1]), cache=cache, mode=Mode.DECODE)
        got.append(model.logits(hidden))
    got = np.concatenate(got, axis=1)                                  # positions: prompt end, then 12 more
    for row, prompt in enumerate(prompts):
        full = np.asarray(model(jnp.asarray([prompt + list(more[row])], jnp.int32)))[0, len(prompt) - 1:]
        np.testing.assert_allclose(got[row], full, atol=1e-4 * np.abs(full).max())


def test_cache_sizes():
    def sizes(cfg, max_len):
        graphdef, state = abstract_model(cfg)
        return cache_bytes(jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(2, max_len)))

    cfg = TINY                                   # pattern M-M*-M-: 3 Mamba, 1 attention layer
    short, long = sizes(cfg, 64), sizes(cfg, 4096)
    assert short["MambaState"] == long["MambaState"] > 0            # flat in context length
    kv_per_token = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # k and v, batch 2, fp32, 1 layer
    assert long["KVCache"] - short["KVCache"] == (4096 - 64) * (kv_per_token + 2)   # + the valid-key flags
    two_attn = sizes(cfg.replace(pattern="M*-M*-"), 4096)
    assert two_attn["KVCache"] == 2 * long["KVCache"] and two_attn["MambaState"] == 2 * long["MambaState"] // 3


def test_sampling_controls():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    key = jax.random.key(0)
    assert (sample(logits, key, 0.0, 0, 1.0) == 0).all()
    assert (sample(logits, key, 1.0, 1, 1.0) == 0).all()                 # top-k 1 is greedy
    toks = np.asarray(sample(logits, key, 1.0, 0, 0.7))                  # top-p 0.7 keeps {0, 1}
    assert set(np.unique(toks)) == {0, 1}
    np.testing.assert_allclose(np.mean(toks == 0), 0.5 / 0.8, atol=0.03)
    toks = np.asarray(sample(logits, key, 1.0, 3, 1.0))
    assert set(np.unique(toks)) == {0, 1, 2}


def test_seeded_sampling_and_stop_tokens_and_streaming():
    model = NemotronH(TINY, nnx.Rngs(0))
    prompts = [[1, 5, 9, 3], [1, 7]]
    a = generate(model, prompts, 12, temperature=1.0, seed=4)
    assert (a == generate(model, prompts, 12, temperature=1.0, seed=4)).all()
    assert not (a == generate(model, prompts, 12, temperature=1.0, seed=5)).all()
    greedy = generate(model, prompts, 12)
    streamed = np.stack(list(stream_generate(model, prompts, 12)), axis=1)
    np.testing.assert_array_equal(streamed, greedy[:, -12:])
    stop = int(greedy[0, -12 + 3])                                        # row 0's 4th new token
    stopped = generate(model, prompts, 12, stop_tokens=[stop])
    first = list(stopped[0, -12:]).index(stop)
    assert (stopped[0, -12 + first + 1:] == 0).all()                      # pads after the stop token


def test_bad_inputs():
    model = NemotronH(TINY, nnx.Rngs(0))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, np.ones((1, 4), np.int32), 2, attention_mask=np.array([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], 0)


def test_cli_generate_from_orbax(tmp_path, capsys):
    from nemojax import save_orbax
    from nemojax.cli import main

    save_orbax(NemotronH(TINY, nnx.Rngs(0)), str(tmp_path / "m"))
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "8",
                 "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and "8 tokens" in captured.err and "tok/s" in captured.err
