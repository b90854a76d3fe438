"""Random-access document sources for training data: text files, JSONL, Parquet and ArrayRecord.

A corpus spec is 'stdlib' (the running Python's standard library, present on every machine), a directory of
.py/.txt/.md files, or a comma-separated list of files / globs ending in .jsonl, .parquet or .array_record
(.txt/.md/.py files are one document each). `Documents(spec)[i]` is the text of document i; every source reads
lazily, so opening a large corpus costs an index, not a pass over the text.
"""

from __future__ import annotations

import bisect
import codecs
import glob
import hashlib
import json
import os
import sysconfig
import threading
import warnings
from typing import Sequence

import numpy as np

TEXT_SUFFIXES = (".py", ".txt", ".md")


class TextFile:
    """One document: the whole file, decoded as UTF-8 (undecodable bytes dropped)."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name

    def __len__(self) -> int:
        return 1

    def get(self, i: int) -> str:
        with open(self.path, "rb") as f:
            return f.read().decode("utf-8", errors="ignore")


class JsonlFile:
    """One document per non-empty line: a JSON object whose `text_key` field is the text."""

    def __init__(self, path: str, name: str, text_key: str):
        self.path, self.name, self.text_key = path, name, text_key
        offsets, pos = [], 0
        with open(path, "rb") as f:                  # one pass over the bytes to index line starts
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: line of document {i} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or self.text_key not in record:
            raise KeyError(f"{self.path}: document {i} has no {self.text_key!r} field (set train.data.text_key)")
        return str(record[self.text_key])


class ParquetFile:
    """One document per row; reads the `text_key` column one row group at a time (the last one is cached)."""

    def __init__(self, path: str, name: str, text_key: str):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'nemojax[data]'") from None
        self.path, self.name, self.text_key = path, name, text_key
        self.file = pq.ParquetFile(path)
        if text_key not in self.file.schema_arrow.names:
            raise KeyError(f"{path}: no column {text_key!r} (columns: {self.file.schema_arrow.names}); "
                           f"set train.data.text_key")
        meta = self.file.metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._group, self._rows = -1, None
        self._lock = threading.Lock()            # grain may read from several threads; pyarrow files are not

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, i: int) -> str:
        group = int(np.searchsorted(self.starts, i, side="right") - 1)
        with self._lock:
            if group != self._group:
                self._rows = self.file.read_row_group(group, columns=[self.text_key]).column(0).to_pylist()
                self._group = group
            return str(self._rows[i - int(self.starts[group])])


class ArrayRecordFile:
    """One document per record: UTF-8 text, or a JSON object holding it under `text_key`."""

    def __init__(self, path: str, name: str, text_key: str):
        import grain

        self.path, self.name, self.text_key = path, name, text_key
        self.source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self.source)

    def get(self, i: int) -> str:
        record = self.source[i]
        text = record.decode("utf-8", errors="ignore")
        if text.startswith("{"):
            try:
                return str(json.loads(text)[self.text_key])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass                                      # plain text that happens to start with '{'
        return text


def is_utf8_text(path: str, sample: int = 1 << 16) -> bool:
    """Whether the file's first `sample` bytes are UTF-8 text (no NUL byte, valid up to a cut-off character)."""
    with open(path, "rb") as f:
        head = f.read(sample)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


def _text_readers(paths: list[tuple[str, str]], what: str) -> list[TextFile]:
    """TextFile readers of the (path, name) pairs that hold UTF-8 text; the others are skipped with one warning."""
    keep, skipped = [], []
    for path, name in paths:
        (keep if is_utf8_text(path) else skipped).append((path, name))
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} of {len(paths)} text files that are not UTF-8 text (binary or "
                      f"another encoding), e.g. {skipped[0][0]}", stacklevel=3)
    if not keep:
        raise FileNotFoundError(f"{what} has no UTF-8 text files" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return [TextFile(p, name) for p, name in keep]


def _text_files(root: str) -> list[TextFile]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests"))
        for f in sorted(filenames):
            if f.endswith(TEXT_SUFFIXES):
                path = os.path.join(dirpath, f)
                paths.append((path, os.path.relpath(path, root)))
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {root!r}")
    return _text_readers(paths, f"corpus {root!r}")


def open_files(spec: str, text_key: str = "text") -> list:
    """The per-file readers of a corpus spec (see the module docstring)."""
    spec = spec.strip()
    if spec == "stdlib":
        return _text_files(sysconfig.get_paths()["stdlib"])
    if os.path.isdir(spec):
        return _text_files(spec)
    readers = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        paths = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not paths:
            raise FileNotFoundError(f"corpus pattern {part!r} matches no files")
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"corpus file {path!r} does not exist")
            name = os.path.basename(path)
            if path.endswith(".jsonl"):
                readers.append(JsonlFile(path, name, text_key))
            elif path.endswith(".parquet"):
                readers.append(ParquetFile(path, name, text_key))
            elif path.endswith(".array_record") or ".array_record-" in name:
                readers.append(ArrayRecordFile(path, name, text_key))
            elif path.endswith(TEXT_SUFFIXES):
                readers += _text_readers([(path, name)], f"corpus file {path!r}")
            else:
                raise ValueError(f"corpus file {path!r}: unknown format (expected .jsonl, .parquet, .array_record "
                                 f"or {'/'.join(TEXT_SUFFIXES)})")
    if not readers:
        raise FileNotFoundError(f"corpus spec {spec!r} names no files")
    return readers


class Documents:
    """Random-access texts of every document of a corpus, in file order."""

    def __init__(self, spec: str, text_key: str = "text"):
        self.spec = spec
        self.files = open_files(spec, text_key)
        self.starts = np.cumsum([0] + [len(f) for f in self.files])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[object, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for a corpus of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return self.files[k], i - int(self.starts[k])

    def __getitem__(self, i: int) -> str:
        reader, j = self.locate(int(i))
        return reader.get(j)

    def keys(self) -> list[str]:
        """A name per document that is the same on every machine (used for the train/validation split)."""
        return [f"{f.name}:{j}" for f in self.files for j in range(len(f))]


def validation_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """Deterministic per-document split: True where the document belongs to validation."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    return np.asarray([int.from_bytes(hashlib.sha1(k.encode()).digest()[:4], "little") / 2 ** 32 < fraction
                       for k in keys], bool)
