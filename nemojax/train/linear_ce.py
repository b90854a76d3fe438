"""The output projection fused with cross entropy, with a hand-written backward pass.

    loss = sum_{b,t} weights[b,t] * (logsumexp_v(h[b,t] . W[:, v]) - h[b,t] . W[:, labels[b,t]])

Autodiff of `log_softmax(h @ W)` leaves XLA to pick the layout of the [tokens, vocab] logits gradient. On CPU
it writes that gradient a second time, transposed, for the weight gradient, and runs the input gradient as a
slow transposed product. Here the backward is three plain ops: p = softmax - onehot (from the saved logits),
dh = p @ W^T, dW = h^T @ p (docs/architecture.md, "Fused output loss", has the measurements).

chunk_tokens > 0 bounds memory instead: the logits exist for one chunk of positions at a time and are
recomputed in the backward pass (one more vocab-sized matmul per step). A 131k vocabulary at 8k tokens holds
4.3 GB of fp32 logits otherwise, plus as much again for their gradient.

Matmuls run in the model's compute dtype with fp32 accumulation; the loss, the softmax and the logits are
fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.sharding import constrain

LOGITS = ("batch", "seq", "vocab")


def _logits(h: jax.Array, w: jax.Array, vocab_major: bool, dtype) -> jax.Array:
    """h [b, t, D] and w ([V, D] if vocab_major else [D, V]) -> fp32 logits [b, t, V]."""
    dims = (((2,), (1 if vocab_major else 0,)), ((), ()))
    out = jax.lax.dot_general(h.astype(dtype), w.astype(dtype), dims, preferred_element_type=jnp.float32)
    return constrain(out, LOGITS)


def _nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log likelihood [b, t], logsumexp [b, t]) of fp32 logits [b, t, V]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0], lse


def _logits_grad(logits: jax.Array, lse: jax.Array, labels: jax.Array, scale: jax.Array) -> jax.Array:
    """d loss / d logits = (softmax - onehot(labels)) * scale[..., None]; fp32 [b, t, V]."""
    p = jnp.exp(logits - lse[..., None])
    onehot = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    return constrain((p - onehot) * scale[..., None], LOGITS)


def _input_and_weight_grads(h, w, dlogits, vocab_major: bool, dtype):
    """(dh [b, t, D] fp32, dw shaped like w, fp32) from dlogits [b, t, V]."""
    dl = dlogits.astype(dtype)
    dh = jax.lax.dot_general(dl, w.astype(dtype), (((2,), (0 if vocab_major else 1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    spec = "btv,btd->vd" if vocab_major else "btd,btv->dv"
    operands = (dl, h.astype(dtype)) if vocab_major else (h.astype(dtype), dl)
    return dh, jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)


def _to_chunks(a: jax.Array, chunk: int) -> jax.Array:
    """[b, t, ...] (t a multiple of chunk) -> [t // chunk, b, chunk, ...]."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape((b, t // chunk, chunk) + a.shape[2:]), 1, 0)


def _from_chunks(a: jax.Array) -> jax.Array:
    n, b, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape((b, n * c) + a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(h, w, labels, weights, vocab_major, dtype, chunk):
    return _fused_fwd(h, w, labels, weights, vocab_major, dtype, chunk)[0]


def _fused_fwd(h, w, labels, weights, vocab_major, dtype, chunk):
    if not chunk:
        logits = _logits(h, w, vocab_major, dtype)
        nll, lse = _nll(logits, labels)
        return jnp.sum(nll * weights), (h, w, labels, weights, nll, lse, logits)

    def one_chunk(_, xs):
        h_c, labels_c = xs
        nll_c, lse_c = _nll(_logits(h_c, w, vocab_major, dtype), labels_c)
        return None, (nll_c, lse_c)

    _, (nll, lse) = jax.lax.scan(one_chunk, None, (_to_chunks(h, chunk), _to_chunks(labels, chunk)))
    nll, lse = _from_chunks(nll), _from_chunks(lse)
    return jnp.sum(nll * weights), (h, w, labels, weights, nll, lse, None)


def _fused_bwd(vocab_major, dtype, chunk, residuals, g):
    h, w, labels, weights, nll, lse, logits = residuals
    scale = g * weights
    if not chunk:
        dh, dw = _input_and_weight_grads(h, w, _logits_grad(logits, lse, labels, scale), vocab_major, dtype)
    else:
        def one_chunk(dw_acc, xs):
            h_c, labels_c, lse_c, scale_c = xs
            dlogits = _logits_grad(_logits(h_c, w, vocab_major, dtype), lse_c, labels_c, scale_c)
            dh_c, dw_c = _input_and_weight_grads(h_c, w, dlogits, vocab_major, dtype)
            return dw_acc + dw_c, dh_c

        xs = tuple(_to_chunks(a, chunk) for a in (h, labels, lse, scale))
        dw, dh = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), xs)
        dh = _from_chunks(dh)
    # labels are integers: no cotangent; the weights' cotangent is the per-token loss
    return dh.astype(h.dtype), dw.astype(w.dtype), None, (g * nll).astype(weights.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array, weights: jax.Array, *,
                         vocab_major: bool = False, compute_dtype=jnp.float32, chunk_tokens: int = 0
                         ) -> jax.Array:
    """sum(weights * token cross entropy) of the logits hidden @ W, without autodiff through the logits.

    hidden [batch, seq, D]; weight [D, V] (an output kernel) or, with vocab_major, [V, D] (tied input
    embeddings); labels [batch, seq] int; weights [batch, seq] float (e.g. mask / number of counted tokens,
    giving the mean). chunk_tokens > 0: process that many positions of every row at a time (the sequence is
    zero-weight padded up to a multiple)."""
    b, t, d = hidden.shape
    if weight.ndim != 2 or weight.shape[1 if vocab_major else 0] != d:
        raise ValueError(f"weight must be {'[V, D]' if vocab_major else '[D, V]'} with D = {d}, got {weight.shape}")
    if labels.shape != (b, t) or weights.shape != (b, t):
        raise ValueError(f"labels and weights must be [batch, seq] = {(b, t)}, got {labels.shape} and {weights.shape}")
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    labels = labels.astype(jnp.int32)
    weights = weights.astype(jnp.float32)
    chunk = min(chunk_tokens, t) if chunk_tokens else 0
    if chunk and t % chunk:
        pad = [(0, 0), (0, chunk - t % chunk)]
        hidden = jnp.pad(hidden, pad + [(0, 0)])
        labels, weights = jnp.pad(labels, pad), jnp.pad(weights, pad)
    return _fused(hidden, weight, labels, weights, vocab_major, jnp.dtype(compute_dtype), chunk)
