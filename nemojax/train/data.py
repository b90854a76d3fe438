"""Training data pipeline with grain.

documents (sources.py) -> one document shard per global batch row (hosts take disjoint rows) -> deterministic
shuffle, repeated (train) -> tokenize (byte-level or an HF tokenizer.json, each document as bos + text + eos)
-> concat-then-split packing into windows of seq_len + 1 tokens (inputs and shifted targets) -> the rows
zipped into batches of batch_size / process_count rows. Packing follows Megatron's GPT datasets: documents are
separated by eos and a window may span a boundary (no attention/state reset), as Nemotron-H was pretrained.

The embedded default corpus is the running Python's standard library (no download), split into train and
validation by file. The train iterator's state goes into every checkpoint, so a resumed run sees the same
batches.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from typing import Iterator, Optional

import numpy as np

from nemojax.config import check_bounds
from nemojax.tokenizer import ByteTokenizer, HFTokenizer
from nemojax.train.sources import Documents, validation_mask

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int = 256
    batch_size: int = 16              # global batch; each host loads batch_size / process_count rows
    corpus: str = "stdlib"            # 'stdlib', a text directory, or files/globs of .jsonl/.parquet/.array_record
    val_corpus: str = ""              # separate validation corpus; empty: val_fraction of the corpus' documents
    val_fraction: float = 0.05
    text_key: str = "text"            # JSONL / Parquet / JSON-record field holding the text
    tokenizer: str = "byte"           # 'byte' or a tokenizer.json file (or a directory holding one)
    bos_id: int = -1                  # -1: the tokenizer's (byte: 1); HF tokenizers without one add none
    eos_id: int = -1                  # -1: the tokenizer's (byte: 2; HF: looked up among common eos tokens)
    seed: int = 0

    def __post_init__(self):
        check_bounds(self, "train.data", 1, "seq_len", "batch_size")
        check_bounds(self, "train.data", 0.0, "val_fraction", high=1.0)


class Tokenize:
    """document text -> {'tokens': [bos] + ids + [eos]} (int32)."""

    def __init__(self, cfg: DataConfig):
        if cfg.tokenizer == "byte":
            tok = ByteTokenizer()
            self.bos, self.eos = tok.bos_id, tok.eos_id
        else:
            path = cfg.tokenizer
            if not os.path.exists(path):
                raise FileNotFoundError(f"tokenizer {path!r} does not exist (expected 'byte' or a tokenizer.json)")
            tok = HFTokenizer(path)
            self.bos = None
            self.eos = next((tok.tok.token_to_id(t) for t in EOS_CANDIDATES if tok.tok.token_to_id(t) is not None),
                            None)
        if cfg.bos_id >= 0:
            self.bos = cfg.bos_id
        if cfg.eos_id >= 0:
            self.eos = cfg.eos_id
        if self.eos is None:
            raise ValueError(f"tokenizer {cfg.tokenizer!r} has none of the eos tokens {EOS_CANDIDATES}; "
                             f"set train.data.eos_id")
        self.tokenizer = tok
        self.vocab_size = tok.vocab_size

    def __call__(self, text: str) -> dict:
        ids = self.tokenizer.encode(text, add_bos=False)
        head = [self.bos] if self.bos is not None else []
        return {"tokens": np.asarray(head + ids + [self.eos], np.int32)}


class DocIndex:
    """The documents of one split on this host: a random-access view over a subset of Documents."""

    def __init__(self, docs: Documents, indices: np.ndarray):
        self.docs, self.indices = docs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.docs[int(self.indices[i])]


class Corpus:
    """Both splits of a DataConfig's corpus and the pipelines over them."""

    def __init__(self, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
        if cfg.batch_size % process_count:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {process_count} hosts")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.tokenize = Tokenize(cfg)

    @cached_property
    def splits(self) -> dict[str, DocIndex]:
        cfg = self.cfg
        docs = Documents(cfg.corpus, cfg.text_key)
        if cfg.val_corpus:
            val_docs = Documents(cfg.val_corpus, cfg.text_key)
            splits = {"train": DocIndex(docs, np.arange(len(docs))),
                      "validation": DocIndex(val_docs, np.arange(len(val_docs)))}
        else:
            is_val = validation_mask(docs.keys(), cfg.val_fraction)
            splits = {"train": DocIndex(docs, np.flatnonzero(~is_val)),
                      "validation": DocIndex(docs, np.flatnonzero(is_val))}
        for name, split in splits.items():
            if len(split) == 0 and not (name == "validation" and cfg.val_fraction == 0 and not cfg.val_corpus):
                raise ValueError(f"the {name} split of corpus {cfg.corpus!r} has no documents")
        return splits

    def _stream(self, docs: DocIndex, seed: Optional[int]):
        """Packed windows {'tokens': [seq_len + 1]} of one document stream; seed=None: in order, once."""
        import grain
        import grain.experimental as gx

        ds = grain.MapDataset.source(docs)
        if seed is not None:
            ds = ds.shuffle(seed=seed).repeat()
        ds = ds.map(self.tokenize).to_iter_dataset()
        return gx.ConcatThenSplitIterDataset(ds, length_struct={"tokens": self.cfg.seq_len + 1})

    def dataset(self, split: str):
        """grain IterDataset of this host's [batch_size / process_count, seq_len + 1] int32 token windows.

        Training: global batch row g packs its own shuffled stream of the documents g, g + rows, g + 2 rows, ...
        so the rows of one batch come from different documents (a shuffle buffer over packed windows would do
        the same, but grain's WindowShuffleIterDataset does not restore its state exactly) and hosts read
        disjoint documents. Validation: this host's documents in order, packed into one stream.
        """
        import grain.experimental as gx

        cfg = self.cfg
        index = self.splits[split]
        rows = cfg.batch_size // self.process_count
        if split != "train":
            shard = DocIndex(index.docs, index.indices[self.process_index::self.process_count])
            return self._stream(shard, None).map(lambda packed: packed["tokens"]).batch(rows, drop_remainder=True)
        if len(index) < cfg.batch_size:
            raise ValueError(f"the train split has {len(index)} documents, fewer than batch_size {cfg.batch_size} "
                             f"(each batch row streams its own share of the documents)")
        streams = []
        for r in range(rows):
            g = self.process_index * rows + r
            streams.append(self._stream(DocIndex(index.docs, index.indices[g::cfg.batch_size]), cfg.seed * 7919 + g))
        return gx.ZipIterDataset(streams).map(lambda row: np.stack([w["tokens"] for w in row]))

    def train_iterator(self, state: Optional[dict] = None):
        """A checkpointable iterator (get_state / set_state) over this host's training batches."""
        it = iter(self.dataset("train"))
        if state is not None:
            it.set_state(state)
        return it

    def validation_batches(self, max_batches: int) -> list[np.ndarray]:
        """The first max_batches validation batches (the same ones every call)."""
        if len(self.splits["validation"]) == 0:
            return []
        out = []
        for batch in self.dataset("validation"):
            if len(out) == max_batches:
                break
            out.append(np.asarray(batch))
        if not out:
            split = self.splits["validation"]
            tokens = sum(len(self.tokenize(split[i])["tokens"]) for i in range(len(split)))
            rows = self.cfg.batch_size // self.process_count
            raise ValueError(f"the validation split ({len(split)} documents, {tokens} tokens) is too small for one "
                             f"batch of {rows} windows of seq_len + 1 = {self.cfg.seq_len + 1} tokens "
                             f"({rows * (self.cfg.seq_len + 1)}); add documents, raise train.data.val_fraction or "
                             f"lower batch_size / seq_len")
        return out


def iter_batches(cfg: DataConfig, split: str = "train", n: int = 1) -> Iterator[np.ndarray]:
    """Convenience: the first n batches of a split on one host (notebooks, tests)."""
    it = iter(Corpus(cfg).dataset(split))
    for _ in range(n):
        yield np.asarray(next(it))
