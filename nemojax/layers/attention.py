"""Grouped-query causal self-attention without any position embedding (architecture.md §4)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.common import Mode, channel_stat, linear, output_init_std, record
from nemojax.layers.norm import RMSNorm

F32 = jnp.float32
QUERY_BLOCK = 256
KEY_BLOCK = 2048          # queries at given positions stream over keys in blocks of this many (online softmax)


class KVCache(NamedTuple):
    """Inference cache of one attention layer: k, v [batch, kv_heads, max_len, head_dim] (head-major, so a decode
    step reads them without transposing), key_valid [batch, max_len] (written, non-padding positions) and pos,
    the number of positions written."""
    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    pos: jax.Array

    LOGICAL_AXES = {"k": ("batch", "kv_heads", "cache_seq", None), "v": ("batch", "kv_heads", "cache_seq", None),
                    "key_valid": ("batch", "cache_seq"), "pos": ()}

    def rewind(self, pos, index=None) -> "KVCache":
        """Back to `pos` written positions; entries past it are rewritten before they are read again."""
        return self._replace(pos=jnp.asarray(pos, jnp.int32))


def cap(scores: jax.Array, softcap: float) -> jax.Array:
    """Softmax capping (Gemma-style): c * tanh(scores / c); identity when softcap is 0."""
    return softcap * jnp.tanh(scores / softcap) if softcap else scores


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array] = None,
                  q_positions: Optional[jax.Array] = None, query_block: int = QUERY_BLOCK,
                  kv_heads_first: bool = False, softcap: float = 0.0,
                  key_block: Optional[int] = KEY_BLOCK) -> jax.Array:
    """Causal GQA with scores and softmax in fp32.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim];
    key_mask [batch, kv_len] (True = real token); q_positions [q_len] or [batch, q_len] index of each query
    in the key axis (default: the queries are the last q_len keys). Returns [batch, q_len, heads, head_dim]
    in q's dtype. K/V heads are never repeated: queries are viewed as [kv_heads, heads_per_kv].

    Queries are processed in blocks of `query_block`, so scores exist for one block at a time. With default
    positions a block only sees the keys up to its end (the masked upper triangle is skipped); with q_positions
    each block scores every key, streaming over blocks of `key_block` keys with an online softmax when there are
    more (so a long cache never holds a [query block, all keys] score matrix; None: one block).

    kv_heads_first: k, v are given as [batch, kv_heads, kv_len, head_dim] (the KV cache layout), which avoids
    transposing the whole cache at every decode step. softcap > 0 caps scores at c * tanh(scores / c).
    """
    b, t, h, hd = q.shape
    if not kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    kvh, s = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kvh})")
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != hd:
        raise ValueError(f"k and v must hold [batch, kv_len, kv_heads, {hd}], got {k.shape} and {v.shape}")
    r = h // kvh
    qh = (q.astype(F32) * hd ** -0.5).astype(q.dtype).reshape(b, t, kvh, r, hd).transpose(0, 2, 3, 1, 4)
    kh, vh = k, v                                                        # [b, kv_heads, s, hd]
    key_ok = None if key_mask is None else key_mask.astype(bool)[:, None, None, None, :]

    def attend(q_blk, key_stop, allowed):
        """q_blk [b, kvh, r, tq, hd] against keys [0, key_stop); allowed broadcasts to [b, kvh, r, tq, key_stop]."""
        scores = cap(jnp.einsum("bkrtd,bksd->bkrts", q_blk, kh[:, :, :key_stop], preferred_element_type=F32),
                     softcap)
        if key_ok is not None:
            allowed = allowed & key_ok[..., :key_stop]
        # finfo.min rather than -inf: a fully padded query row becomes uniform instead of NaN (NaN * 0 = NaN
        # would leak through the Mamba layers' padding mask).
        scores = jnp.where(allowed, scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkrts,bksd->bkrtd", probs, vh[:, :, :key_stop], preferred_element_type=F32)

    def key_blocks():
        """Keys, values, key mask and key index in blocks of key_block along a leading axis (padded at the end),
        built once for every query block: [nb, b, kvh, key_block, hd] x 2, [nb, b, key_block], [nb, key_block]."""
        nb = -(-s // key_block)
        pad = nb * key_block - s

        def blocks(a):
            a = jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
            return a.reshape(b, kvh, nb, key_block, hd).transpose(2, 0, 1, 3, 4)

        ok = jnp.ones((b, s), bool) if key_mask is None else key_mask.astype(bool)
        ok = jnp.pad(ok, ((0, 0), (0, pad))).reshape(b, nb, key_block).transpose(1, 0, 2)
        return blocks(kh), blocks(vh), ok, jnp.arange(nb * key_block).reshape(nb, key_block)

    def attend_streamed(q_blk, q_pos, blocked):
        """q_blk [b, kvh, r, tq, hd] at positions q_pos [b, tq] against every key, one block of `blocked`
        (key_blocks) at a time: running max m, normaliser l and output acc (fp32). Masked keys score finfo.min
        like `attend` (a fully padded row averages every key), keys past the cache -inf (nothing)."""

        def step(carry, xs):
            m, l, acc = carry
            k_blk, v_blk, ok_blk, idx = xs
            scores = cap(jnp.einsum("bkrtd,bksd->bkrts", q_blk, k_blk, preferred_element_type=F32), softcap)
            allowed = (q_pos[:, None, None, :, None] >= idx) & ok_blk[:, None, None, None, :]
            scores = jnp.where(allowed, scores, jnp.finfo(F32).min)
            scores = jnp.where(idx < s, scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.exp(scores - m_new[..., None])
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bkrts,bksd->bkrtd", p.astype(v.dtype), v_blk,
                                                     preferred_element_type=F32)
            return (m_new, l * corr + p.sum(axis=-1), acc), None

        shape = q_blk.shape[:4]
        init = (jnp.full(shape, -jnp.inf, F32), jnp.zeros(shape, F32), jnp.zeros(q_blk.shape, F32))
        (_, l, acc), _ = jax.lax.scan(step, init, blocked)
        return acc / l[..., None]

    pos = None if q_positions is None else jnp.broadcast_to(q_positions, (b, t))
    blocked = key_blocks() if pos is not None and key_block is not None and s > key_block else None
    outs = []
    for start in range(0, t, query_block):
        stop = min(t, start + query_block)
        if pos is None:           # the queries are the last t keys: a block sees keys up to its own end
            causal = (jnp.arange(start, stop)[:, None] + s - t) >= jnp.arange(s - t + stop)[None, :]
            outs.append(attend(qh[:, :, :, start:stop], s - t + stop, causal))
        elif blocked is not None:                          # positions known at run time only: every key
            outs.append(attend_streamed(qh[:, :, :, start:stop], pos[:, start:stop], blocked))
        else:
            outs.append(attend(qh[:, :, :, start:stop], s, pos[:, None, None, start:stop, None] >= jnp.arange(s)))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q.dtype)


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     key_valid: jax.Array, pos, softcap: float = 0.0) -> jax.Array:
    """One new token per row attending to the cached positions < pos and to itself.

    q [b, 1, heads, hd]; k_new, v_new [b, 1, kv_heads, hd]; cache_k/v [b, kv_heads, max_len, hd] *before* this
    token is written; key_valid [b, max_len]. The new key is scored as an extra column instead of reading the
    cache after writing it, which made XLA copy the whole cache every decode step (docs/architecture.md,
    "Inference cache").
    """
    b, _, h, hd = q.shape
    kvh, s = cache_k.shape[1], cache_k.shape[2]
    r = h // kvh
    qg = (q[:, 0].astype(F32) * hd ** -0.5).astype(q.dtype).reshape(b, kvh, r, hd)
    scores = cap(jnp.einsum("bkrd,bksd->bkrs", qg, cache_k, preferred_element_type=F32), softcap)
    allowed = (key_valid.astype(bool) & (jnp.arange(s)[None, :] < pos))[:, None, None, :]
    scores = jnp.where(allowed, scores, jnp.finfo(F32).min)
    own = cap(jnp.einsum("bkrd,bkd->bkr", qg, k_new[:, 0], preferred_element_type=F32), softcap)[..., None]
    probs = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1)
    out = jnp.einsum("bkrs,bksd->bkrd", probs[..., :s].astype(cache_v.dtype), cache_v, preferred_element_type=F32)
    out = out + probs[..., s:] * v_new[:, 0, :, None, :].astype(F32)
    return out.reshape(b, 1, h, hd).astype(q.dtype)


class Attention(nnx.Module):
    """x [batch, seq, hidden] -> [batch, seq, hidden] with the mixer interface of layers/common.py;
    q_proj [hidden, heads*hd], k/v_proj [hidden, kv*hd].

    Optional stability options (off for every published model): attn_qk_norm / attn_qkv_norm add per-head
    RMSNorms (weights [head_dim]) on Q, K (and V) after the projection (QKV-norm also removes the block's
    pre-norm: `pre_norm`); attn_softcap caps the scores.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hd = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = linear(cfg, d, self.num_heads * hd, rngs, ("embed", "heads"))
        self.k_proj = linear(cfg, d, self.num_kv_heads * hd, rngs, ("embed", "kv_heads"))
        self.v_proj = linear(cfg, d, self.num_kv_heads * hd, rngs, ("embed", "kv_heads"))
        self.o_proj = linear(cfg, self.num_heads * hd, d, rngs, ("heads", "embed"), std=output_init_std(cfg))
        self.softcap = cfg.attn_softcap
        qk, eps, pd = cfg.attn_qk_norm or cfg.attn_qkv_norm, cfg.layer_norm_epsilon, cfg.param_dtype
        self.q_norm = RMSNorm(hd, eps, pd, "head_dim") if qk else None
        self.k_norm = RMSNorm(hd, eps, pd, "head_dim") if qk else None
        self.v_norm = RMSNorm(hd, eps, pd, "head_dim") if cfg.attn_qkv_norm else None
        self.pre_norm = not cfg.attn_qkv_norm          # QKV-norm replaces the block's pre-norm

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                       jnp.zeros((), jnp.int32))

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q).astype(q.dtype), self.k_norm(k).astype(k.dtype)
        if self.v_norm is not None:
            v = self.v_norm(v).astype(v.dtype)
        return q, k, v

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 mode: Mode = Mode.TRAIN) -> tuple[jax.Array, Optional[KVCache]]:
        """mask [batch, seq] (1 = real token) masks padded keys. With a cache the t new tokens are written at
        positions [pos, pos + t) (PREFILL: pos = 0, so the cache must be empty) and attend to every valid cached
        position up to their own."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        if mode is Mode.TRAIN:
            out = gqa_attention(q, k, v, key_mask=mask, softcap=self.softcap)
            # head importance: L2 over each head's channels of the o_proj input (Minitron)
            record(self, lambda: {"heads": channel_stat(jnp.linalg.norm(out.astype(F32), axis=-1))})
            return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), None
        pos = 0 if mode is Mode.PREFILL else cache.pos           # a Python 0 keeps the prefill slices static
        new_valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        key_valid = jax.lax.dynamic_update_slice(cache.key_valid, new_valid, (0, pos))
        if mode is Mode.DECODE:                                  # reads the cache as it was before the write
            if t != 1:
                raise ValueError(f"DECODE takes one token per row, got {t}")
            out = decode_attention(q, k, v, cache.k, cache.v, key_valid, pos, softcap=self.softcap)
            # A data dependency of the written values on the attention output orders the cache read before the
            # in-place write; without it XLA cannot prove the order inside a decode loop and copies both caches
            # every step. Adding 0 * a finite value changes nothing.
            after_read = 0 * out[:, :, :1, :1]
            k, v = k + after_read.astype(k.dtype), v + after_read.astype(v.dtype)
        k_all, v_all = (jax.lax.dynamic_update_slice(c, new.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, pos, 0))
                        for c, new in ((cache.k, k), (cache.v, v)))
        if mode is Mode.PREFILL:                                 # blocked attention over the new keys
            out = gqa_attention(q, k, v, key_mask=new_valid, softcap=self.softcap)
        elif mode in (Mode.EXTEND, Mode.VERIFY):                # new tokens continuing the cache
            out = gqa_attention(q, k_all, v_all, key_mask=key_valid, q_positions=pos + jnp.arange(t),
                                kv_heads_first=True, softcap=self.softcap)
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return out, KVCache(k_all, v_all, key_valid, jnp.asarray(pos + t, jnp.int32))
