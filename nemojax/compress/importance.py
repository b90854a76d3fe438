"""Importance of every prunable unit of a model, from its activations on a calibration set (Minitron,
Minitron-SSM, Nemotron Elastic; shared/research/quant_training.md §6).

One TRAIN-mode forward per calibration batch runs under nnx.capture(Importance): the layers `record` sums of
their activation statistics (layers/common.py), keyed by module path, e.g. "layers/3/mixer/x". What they record:

    block   embed    [hidden]            pre-norm output, Minitron's aggregation (mean |a| over the sequence,
                                         squared, summed over rows); the embedding-channel score sums its square
                                         root over every block
            cosine, tokens               sum of cos(block input, block output) and the positions seen: block
                                         importance BI = 1 - mean cos
    MLP     neurons  [F]                 squared-ReLU output (the down projection's input)
    attention heads  [heads]             L2 over each head's channels of the o_proj input
    Mamba   x        [heads, head_dim]   the x part of the input projection (Minitron-SSM's best choice)
    MoE     expert_load [E], expert_output [E] (routing weight * ||expert output||), expert_neurons [E, I]

Scores are square roots of the summed statistics (Minitron: L2 over the batch of the sequence mean). Depth is
also scored by dropping each layer in turn (`depth_scores`): the increase of the LM loss, and the normalized MSE
of the logits against the full model (Nemotron Elastic's layer ranking).

`Scores` is what `nemojax prune` saves (safetensors, beside a JSON header naming the model's architecture) so a
model can be pruned again to other sizes without recomputing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.layers.common import Importance
from nemojax.model import PERSISTENT, NemotronH, abstract_model, materialize

F32 = jnp.float32


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass
class Scores:
    """Summed activation statistics by '/'-joined module path and name (module docstring), the tokens they
    were gathered over, optional depth scores ('depth/loss', 'depth/nmse' [layers]) and the architecture scored
    (a dict of ModelConfig fields without runtime options)."""
    stats: dict[str, np.ndarray]
    tokens: int
    architecture: dict

    def save(self, path: str) -> None:
        """Writes a temporary sibling and renames it over `path` (an existing file stays whole until then)."""
        from safetensors.numpy import save_file

        meta = {"nemojax_scores": json.dumps({"tokens": self.tokens, "architecture": self.architecture})}
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in self.stats.items()}
        tmp = f"{path}.writing-{os.getpid()}"
        try:
            save_file(arrays, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, cfg: Optional[ModelConfig] = None) -> "Scores":
        """Reads a scores file; with cfg, refuses one computed for another architecture."""
        from safetensors import safe_open

        try:
            with safe_open(path, "np") as f:
                meta = json.loads((f.metadata() or {})["nemojax_scores"])
                stats = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a nemojax importance-scores file ({e})") from e
        scores = cls(stats, int(meta["tokens"]), meta["architecture"])
        if cfg is not None and scores.architecture != architecture(cfg):
            raise ValueError(f"{path} holds scores of another model (e.g. " + ", ".join(
                f"{k} {scores.architecture.get(k)!r} vs {v!r}" for k, v in architecture(cfg).items()
                if scores.architecture.get(k) != v)[:200] + "); recompute them for this model")
        return scores

    # ------------------------------------------------------------------ derived scores
    def get(self, unit: tuple, name: str) -> np.ndarray:
        key = _key(unit + ("mixer", name)) if name not in ("embed", "cosine", "tokens") else _key(unit + (name,))
        if key not in self.stats:
            raise KeyError(f"no importance statistic {key!r} (was the calibration forward run on this model?)")
        return np.asarray(self.stats[key], np.float64)

    def embed(self) -> np.ndarray:
        """Embedding-channel scores [hidden]: the sum over every block of its pre-norm output score."""
        parts = [np.sqrt(np.asarray(v, np.float64)) for k, v in self.stats.items() if k.endswith("/embed")]
        if not parts:
            raise KeyError("no embedding-channel statistics")
        return np.sum(parts, axis=0)

    def block_importance(self, n_layers: int) -> np.ndarray:
        """BI = 1 - mean cos(input, output) of each main-model layer [layers]."""
        return np.asarray([1.0 - self.get(("layers", i), "cosine") / self.get(("layers", i), "tokens")
                           for i in range(n_layers)])


def architecture(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "runtime"}, default=str))


def calibration_batches(model_cfg: ModelConfig, texts: Iterable[str], tokenizer, tokens: int, seq_len: int,
                        batch: int) -> list[np.ndarray]:
    """Batches [batch, seq_len + 1] int32 of consecutive windows over the first `tokens` tokens of the documents
    (bos + text + eos, as `nemojax eval` reads a corpus); a padded last window and a short last batch are dropped
    unless they are all there is."""
    from nemojax.evaluation import token_stream, windows

    if min(tokens, seq_len, batch) < 1:
        raise ValueError(f"calibration tokens, seq_len and batch must be >= 1, got {tokens}, {seq_len}, {batch}")
    stream, _, _ = token_stream(texts, tokenizer, model_cfg.bos_token_id, (model_cfg.stop_token_ids or (None,))[0],
                                tokens)
    if int(stream.max()) >= model_cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {int(stream.max())}, outside the model's vocabulary of "
                         f"{model_cfg.vocab_size}")
    stream = stream[:tokens + 1]                                 # whole documents may overshoot by far
    rows, _ = windows(stream, seq_len, model_cfg.pad_token_id or 0)
    if len(rows) > 1 and (len(stream) - 1) % seq_len:
        rows = rows[:-1]                                         # no padded window in the statistics
    out = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    return out if len(out) == 1 else [b for b in out if len(b) == batch]


def _unrolled(model: NemotronH) -> NemotronH:
    """The model with its layers unrolled (captures are per module; a scanned unit would merge its repeats)."""
    if not model.config.runtime.scan_layers:
        return model
    values = {p: v.get_value() for p, v in nnx.state(model, PERSISTENT).flat_state()}
    return materialize(*abstract_model(model.config.replace(scan_layers=False)), values)


def collect(model: NemotronH, batches: Iterable[np.ndarray]) -> Scores:
    """Sums the activation statistics of every layer (and the MTP head's) over the batches [b, seq + 1] (the
    last token of a window is only a target, so it is not fed)."""
    model = _unrolled(model)
    graphdef, state = nnx.split(model)
    with_mtp = model.mtp is not None

    @jax.jit
    def one(state, ids):
        def forward(m, ids):
            if with_mtp:
                return m.forward_with_mtp(ids, depth=len(m.mtp))[0]
            return m.forward(ids)[0]

        _, captured = nnx.capture(forward, Importance)(nnx.merge(graphdef, state), ids)
        return {_key(path): v.get_value() for path, v in captured.flat_state()}

    total, tokens = None, 0
    for ids in batches:
        ids = jnp.asarray(ids)[:, :-1]
        out = one(state, ids)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
        tokens += int(ids.size)
    if total is None:
        raise ValueError("no calibration batches")
    stats = {k: np.asarray(v, np.float32) for k, v in jax.device_get(total).items()}
    return Scores(stats, tokens, architecture(model.config))


@nnx.jit
def _loss_and_logits(model: NemotronH, tokens: jax.Array):
    logits = model(tokens[:, :-1]).astype(F32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll), logits


def depth_scores(model: NemotronH, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """For each main-model layer i, with the model that lacks it (prune.drop_layers): 'depth/loss' the increase of
    the mean next-token loss, 'depth/nmse' the normalized MSE of its logits against the full model's,
    sum ||l_full - l_dropped||^2 / sum ||l_full||^2 (Nemotron Elastic's layer ranking). Higher = more important."""
    from nemojax.compress.prune import drop_layers

    batches = [jnp.asarray(b) for b in batches]
    full = [_loss_and_logits(model, b) for b in batches]
    base = float(np.mean([float(loss) for loss, _ in full]))
    norm = sum(float(jnp.sum(logits ** 2)) for _, logits in full)
    loss, nmse = [], []
    for i in range(model.config.num_layers):
        if model.config.num_layers == 1:
            loss.append(math.inf)
            nmse.append(1.0)
            continue
        dropped = drop_layers(model, (i,))
        runs = [_loss_and_logits(dropped, b) for b in batches]
        loss.append(float(np.mean([float(lo) for lo, _ in runs])) - base)
        nmse.append(sum(float(jnp.sum((lf - ld) ** 2)) for (_, lf), (_, ld) in zip(full, runs)) / max(norm, 1e-30))
    return {"depth/loss": np.asarray(loss, np.float32), "depth/nmse": np.asarray(nmse, np.float32)}
