"""Perplexity and bits per byte of a model on a corpus (`nemojax eval`).

The corpus (any spec the trainer reads: `stdlib`, a directory, .txt/.jsonl/.parquet/.array_record files) is
read document by document in file order; each document becomes [bos] + tokens + [eos] (the model config's
special tokens), and the documents are concatenated into one stream. The stream is cut into non-overlapping
windows of seq_len + 1 tokens that share their boundary token (window k holds tokens k*seq_len .. (k+1)*seq_len),
so every token but the first is predicted exactly once, from the context inside its window. The last window is
right-padded and its padding weighs nothing (the model is causal, so padding cannot change earlier positions).

  loss (nats/token) = sum of -log p(token | window context) / tokens predicted
  perplexity        = exp(loss)
  bits per byte     = sum of -log2 p / UTF-8 bytes of the documents read
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.model import NemotronH


def token_stream(texts: Iterable[str], tokenizer, bos: Optional[int], eos: Optional[int],
                 max_tokens: int) -> tuple[np.ndarray, int, int]:
    """(stream int32 [T], documents read, UTF-8 bytes read): whole documents until the stream holds at least
    max_tokens + 1 tokens (max_tokens predictions) or the corpus ends."""
    pieces, total, docs, nbytes = [], 0, 0, 0
    for text in texts:
        ids = ([bos] if bos is not None else []) + tokenizer.encode(text, add_bos=False) + \
            ([eos] if eos is not None else [])
        pieces.append(np.asarray(ids, np.int32))
        total += len(ids)
        docs += 1
        nbytes += len(text.encode("utf-8"))
        if total > max_tokens:
            break
    if total < 2:
        raise ValueError(f"the corpus holds {total} tokens; at least 2 are needed to predict one")
    return np.concatenate(pieces), docs, nbytes


def windows(stream: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, seq_len + 1], weights [n, seq_len]) of the non-overlapping windows of stream (see the module
    docstring); weights are 1 where a real token is predicted, 0 on padding."""
    n = math.ceil((len(stream) - 1) / seq_len)
    tokens = np.full((n, seq_len + 1), pad_id, np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    for k in range(n):
        part = stream[k * seq_len: (k + 1) * seq_len + 1]
        tokens[k, :len(part)] = part
        weights[k, :len(part) - 1] = 1.0
    return tokens, weights


@nnx.jit
def _nll_sum(model: NemotronH, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum over the batch of -log p(tokens[:, 1:] | tokens[:, :-1]) * weights (fp32)."""
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights)


def evaluate(model: NemotronH, texts: Iterable[str], tokenizer, seq_len: int = 1024, batch: int = 8,
             max_tokens: int = 100_000, progress: bool = False) -> dict:
    """{'loss', 'perplexity', 'bits_per_byte', 'tokens', 'documents', 'bytes'} of model on the texts (module
    docstring). Every batch has the same shape (a short last batch is padded with weightless rows), so the
    forward compiles once."""
    from tqdm.auto import tqdm

    if seq_len < 1 or batch < 1 or max_tokens < 1:
        raise ValueError(f"seq_len, batch and max_tokens must be >= 1, got {seq_len}, {batch}, {max_tokens}")
    cfg = model.config
    stream, docs, nbytes = token_stream(texts, tokenizer, cfg.bos_token_id, (cfg.stop_token_ids or (None,))[0],
                                        max_tokens)
    if int(stream.max()) >= cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {int(stream.max())}, outside the model's vocabulary of "
                         f"{cfg.vocab_size}: is it the model's tokenizer?")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens, weights = windows(stream, seq_len, pad)
    rows = math.ceil(len(tokens) / batch) * batch
    tokens = np.concatenate([tokens, np.full((rows - len(tokens), seq_len + 1), pad, np.int32)])
    weights = np.concatenate([weights, np.zeros((rows - len(weights), seq_len), np.float32)])
    total = 0.0
    for start in tqdm(range(0, rows, batch), desc="eval", unit="batch", disable=not progress, dynamic_ncols=True):
        total += float(_nll_sum(model, jnp.asarray(tokens[start:start + batch]),
                                jnp.asarray(weights[start:start + batch])))
    predicted = int(weights.sum())
    loss = total / predicted
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / max(nbytes, 1),
            "tokens": predicted, "documents": docs, "bytes": nbytes}
