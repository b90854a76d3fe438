"""Generation: jitted prefill, then one compiled decode loop (lax.while_loop) with greedy / temperature /
top-k / top-p sampling and stop tokens; a streaming variant; and MTP speculative decoding (speculative.py).

Prompts of different lengths are left-padded to a common length with an attention mask: padded tokens leave
the Mamba states at zero and are masked as attention keys, so each row generates as if alone. The same makes
chunked prefill exact: a prompt longer than `prefill_chunk` is left-padded to a multiple of it and read chunk by
chunk (EXTEND, the Mamba states and KV cache carried), so activation memory follows the chunk, not the prompt.

With `mesh=`, the model is placed on the mesh by its parameters' logical axes (sharding.RULES), prompts are
split over the batch axes and every cache array is pinned by its declared logical axes (batch over data, KV
heads and Mamba heads over tensor, experts over expert): generation runs sharded, without gathering weights.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.layers.common import Mode
from nemojax.model import NemotronH
from nemojax.sharding import constrain_cache, place, shard_model

PREFILL_CHUNK = 8192          # default: prompts longer than this are prefilled chunk by chunk


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists of different lengths -> (ids [batch, max_len] int32, mask [batch, max_len] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits [batch, vocab] fp32 -> token ids [batch]. temperature 0 is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def chunk_pad(ids: np.ndarray, mask: np.ndarray, chunk: Optional[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads [batch, p] prompts to a multiple of `chunk` when p > chunk (for _prefill's chunked path)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer or None, got {chunk!r}")
    p = ids.shape[1]
    if chunk is None or p <= chunk:
        return ids, mask
    extra = -p % chunk
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0))))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "chunk"))
def _prefill(graphdef, state, ids, mask, max_len, chunk=None):
    """Prompt ids [b, p] into a fresh cache of max_len positions -> (last position's logits [b, V], cache).
    With chunk < p (p a multiple of chunk: chunk_pad) a scan reads one chunk at a time in EXTEND mode."""
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    cache = constrain_cache(model.init_cache(b, max_len))
    if chunk is None or p <= chunk:
        hidden, cache = model.forward(ids, mask=mask, cache=cache, mode=Mode.PREFILL)
        return model.logits(hidden[:, -1]), constrain_cache(cache)

    def one_chunk(cache, chunk_ids_mask):
        hidden, cache = model.forward(chunk_ids_mask[0], mask=chunk_ids_mask[1], cache=cache, mode=Mode.EXTEND)
        return constrain_cache(cache), hidden[:, -1]

    by_chunk = tuple(a.reshape(b, p // chunk, chunk).swapaxes(0, 1) for a in (ids, mask))
    cache, last = jax.lax.scan(one_chunk, cache, by_chunk)
    return model.logits(last[-1]), cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_step(graphdef, state, tokens, cache):
    """One token per row [b] continuing cache -> (logits [b, V], cache)."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model.forward(tokens[:, None], cache=cache, mode=Mode.DECODE)
    return model.logits(hidden[:, 0]), constrain_cache(cache)


def on_mesh(model: NemotronH, mesh, *arrays) -> tuple:
    """(a factory of the context to run jitted generation in, arrays [batch, ...] as device arrays). With a mesh
    the model is placed on it (in place; already placed arrays do not move) and the arrays are split over the
    batch axes."""
    if mesh is None:
        return contextlib.nullcontext, *(jnp.asarray(a) for a in arrays)
    shard_model(model, mesh)
    return (lambda: jax.set_mesh(mesh)), *(place(a, ("batch",) + (None,) * (np.ndim(a) - 1), mesh) for a in arrays)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id", "chunk"))
def _generate(graphdef, state, ids, mask, key, *, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id,
              chunk):
    b, p = ids.shape
    logits, cache = _prefill(graphdef, state, ids, mask, p + max_new_tokens, chunk)
    key, sub = jax.random.split(key)
    first = sample(logits, sub, temperature, top_k, top_p)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, out, done, key = carry
        logits, cache = _decode_step(graphdef, state, out[:, step - 1], cache)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample(logits, sub, temperature, top_k, top_p))
        out = out.at[:, step].set(tok)
        return step + 1, cache, out, done | jnp.isin(tok, stops), key

    _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1), cache, out, done, key))
    return out


def prepare(model: NemotronH, input_ids, attention_mask=None, max_new_tokens: int = 1, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """The one check of generation inputs (generate, stream_generate, speculative_generate, the CLI): settings in
    range and token ids inside the vocabulary. -> (ids [batch, seq] int32, mask [batch, seq] int32, pad id),
    token lists left-padded."""
    vocab, pad_id = model.config.vocab_size, model.config.pad_token_id or 0
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, vocab_size={vocab}] (0 = off), got {top_k}")
    lists = isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray))
    flat = (np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in input_ids]) if lists
            else np.asarray(input_ids, np.int64).reshape(-1))
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
        raise ValueError(f"token ids must be in [0, vocab_size={vocab}), got ids from {flat.min()} to {flat.max()}")
    if lists:
        if attention_mask is not None:
            raise ValueError("pass either token lists (padded for you) or ids with an attention_mask, not both")
        ids, mask = left_pad(input_ids, pad_id)
        return ids, mask, pad_id
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq] or a list of token lists, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if (mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    return ids, mask, pad_id


def generate(model: NemotronH, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Optional[Sequence[int]] = None, seed: int = 0,
             attention_mask=None, mesh=None, prefill_chunk: Optional[int] = PREFILL_CHUNK) -> np.ndarray:
    """Returns [batch, prompt_len + max_new_tokens] int32: the (left-padded) prompt followed by the new tokens;
    after a stop token a row continues with pad tokens. input_ids: [batch, seq] (left-padded, with
    attention_mask) or a list of token lists of any lengths. mesh: a jax Mesh (sharding.make_mesh) to run on;
    prefill_chunk: prompts longer than this are prefilled chunk by chunk (None: in one pass)."""
    ids, mask, pad_id = prepare(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    chunk_ids, chunk_mask = chunk_pad(ids, mask, prefill_chunk, pad_id)
    context, chunk_ids, chunk_mask = on_mesh(model, mesh, chunk_ids, chunk_mask)
    graphdef, state = nnx.split(model)
    with context():
        new = _generate(graphdef, state, chunk_ids, chunk_mask, jax.random.key(seed),
                        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                        top_p=float(top_p), stop_tokens=tuple(int(t) for t in (stop_tokens or ())), pad_id=pad_id,
                        chunk=prefill_chunk)
    return np.concatenate([ids, np.asarray(new)], axis=1)


def stream_generate(model: NemotronH, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, stop_tokens: Optional[Sequence[int]] = None, seed: int = 0,
                    attention_mask=None, mesh=None, prefill_chunk: Optional[int] = PREFILL_CHUNK
                    ) -> Iterator[np.ndarray]:
    """Yields each step's tokens [batch] as they are produced (one compiled step, reused every token).
    Stops when every row has produced a stop token or max_new_tokens is reached. Inputs are checked on the call,
    not at the first token. mesh and prefill_chunk as in generate."""
    ids, mask, pad_id = prepare(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    ids, mask = chunk_pad(ids, mask, prefill_chunk, pad_id)
    return _stream(model, ids, mask, pad_id, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, mesh,
                   prefill_chunk)


def _stream(model, ids, mask, pad_id, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, mesh, chunk):
    context, ids_d, mask_d = on_mesh(model, mesh, ids, mask)
    graphdef, state = nnx.split(model)
    with context():
        logits, cache = _prefill(graphdef, state, ids_d, mask_d, ids.shape[1] + max_new_tokens, chunk)
    key = jax.random.key(seed)
    done = np.zeros(ids.shape[0], bool)
    stops = set(int(t) for t in (stop_tokens or ()))
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = np.where(done, pad_id, np.asarray(sample(logits, sub, temperature, top_k, top_p)))
        yield tok
        done |= np.isin(tok, list(stops)) if stops else False
        if done.all() or step == max_new_tokens - 1:
            return
        with context():
            logits, cache = _decode_step(graphdef, state, jnp.asarray(tok), cache)
