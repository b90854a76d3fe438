"""Training data with grain.

The embedded default corpus is the source of the running Python's standard library (present on every
machine, so the demo needs no download), split into train and validation *by file* with a stable hash.
Documents are byte-tokenized, joined with an eos separator between documents, and cut into windows of
seq_len + 1 tokens (inputs and shifted targets); grain shuffles the windows deterministically and batches
them, and its iterator state goes into every checkpoint so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from typing import Iterator, Optional

import numpy as np

from nemojax.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int = 256
    batch_size: int = 16
    corpus: str = "stdlib"            # 'stdlib' or a directory of .py/.txt/.md files
    max_bytes: int = 4_000_000        # cap on corpus bytes read (per split share), keeps start-up short
    val_fraction: float = 0.05
    seed: int = 0


def corpus_files(corpus: str) -> list[str]:
    root = sysconfig.get_paths()["stdlib"] if corpus == "stdlib" else corpus
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus directory {root!r} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith((".py", ".txt", ".md"))]
    if not files:
        raise FileNotFoundError(f"no .py/.txt/.md files under {root!r}")
    return files


def is_validation(path: str, fraction: float) -> bool:
    digest = hashlib.sha1(os.path.basename(path).encode() + path.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2 ** 32 < fraction


def split_tokens(cfg: DataConfig, split: str, tokenizer=None) -> np.ndarray:
    """All tokens of one split, documents separated by eos. Files in sorted order, capped at max_bytes."""
    tok = tokenizer or ByteTokenizer()
    budget = cfg.max_bytes if split == "train" else max(1, int(cfg.max_bytes * cfg.val_fraction * 2))
    pieces, used = [], 0
    for path in corpus_files(cfg.corpus):
        if is_validation(path, cfg.val_fraction) != (split == "validation"):
            continue
        with open(path, "rb") as f:
            text = f.read(budget - used).decode("utf-8", errors="ignore")
        ids = tok.encode(text, add_bos=True) + [tok.eos_id]
        pieces.append(np.asarray(ids, np.int32))
        used += len(text.encode("utf-8"))
        if used >= budget:
            break
    if not pieces:
        raise ValueError(f"the {split} split of corpus {cfg.corpus!r} is empty")
    return np.concatenate(pieces)


class Windows:
    """Random-access view of non-overlapping windows of seq_len + 1 tokens (a grain data source)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.width = tokens, seq_len + 1
        if len(tokens) < self.width:
            raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one window of {self.width}")

    def __len__(self) -> int:
        return len(self.tokens) // self.width

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i * self.width:(i + 1) * self.width]


def make_dataset(cfg: DataConfig, split: str, tokens: Optional[np.ndarray] = None):
    """grain dataset of {'tokens': [batch, seq_len + 1] int32}; the train split repeats and reshuffles."""
    import grain

    ds = grain.MapDataset.source(Windows(split_tokens(cfg, split) if tokens is None else tokens, cfg.seq_len))
    if split == "train":
        ds = ds.shuffle(seed=cfg.seed).repeat()
    return ds.batch(cfg.batch_size, drop_remainder=True)


def train_iterator(cfg: DataConfig, state: Optional[dict] = None, tokens: Optional[np.ndarray] = None):
    """A checkpointable iterator (get_state / set_state) over training batches."""
    it = iter(make_dataset(cfg, "train", tokens).to_iter_dataset())
    if state is not None:
        it.set_state(state)
    return it


def validation_batches(cfg: DataConfig, max_batches: int, tokens: Optional[np.ndarray] = None) -> Iterator:
    ds = make_dataset(cfg, "validation", tokens)
    for i in range(min(max_batches, len(ds))):
        yield ds[i]
