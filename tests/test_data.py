"""Training data: document sources (text dirs, JSONL, Parquet, ArrayRecord), packing, tokenizers, per-host
sharding and checkpointable iterator state."""

import json

import numpy as np
import pytest

from nemojax.train.data import Corpus, DataConfig
from nemojax.train.sources import Documents

TEXTS = [f"document {i}: " + "abcdefghij"[i % 10] * (5 + 7 * i) + "\n" for i in range(30)]


def write_formats(tmp_path) -> dict:
    """The same 30 documents as JSONL, Parquet (several row groups) and ArrayRecord."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    paths = {"jsonl": str(tmp_path / "docs.jsonl"), "parquet": str(tmp_path / "docs.parquet"),
             "array_record": str(tmp_path / "docs.array_record")}
    with open(paths["jsonl"], "w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "text": t}) + "\n" + ("\n" if i == 3 else ""))   # a blank line is skipped
    pq.write_table(pa.table({"id": list(range(30)), "text": TEXTS}), paths["parquet"], row_group_size=7)
    writer = ArrayRecordWriter(paths["array_record"], "group_size:1")
    for t in TEXTS:
        writer.write(t.encode())
    writer.close()
    return paths


def byte_doc(text: str) -> list[int]:
    return [1] + [b + 3 for b in text.encode()] + [2]            # bos, bytes shifted by 3, eos


def test_every_format_reads_the_same_documents(tmp_path):
    paths = write_formats(tmp_path)
    for kind, path in paths.items():
        docs = Documents(path)
        assert len(docs) == 30, kind
        assert [docs[i] for i in (0, 6, 7, 29)] == [TEXTS[i] for i in (0, 6, 7, 29)], kind
    both = Documents(f"{paths['jsonl']},{paths['parquet']}")
    assert len(both) == 60 and both[30] == TEXTS[0] and both[59] == TEXTS[29]


def test_packing_concatenates_documents_in_order(tmp_path):
    """Validation batches are unshuffled, so the packed windows are the documents' tokens back to back."""
    path = write_formats(tmp_path)["jsonl"]
    cfg = DataConfig(seq_len=15, batch_size=2, corpus=path, val_corpus=path)
    batches = Corpus(cfg).validation_batches(5)
    stream = np.concatenate([b.reshape(-1) for b in batches])
    expected = np.concatenate([byte_doc(t) for t in TEXTS])[:len(stream)]
    assert batches[0].shape == (2, 16) and batches[0].dtype == np.int32
    np.testing.assert_array_equal(stream, expected)


def test_formats_give_identical_training_batches(tmp_path):
    paths = write_formats(tmp_path)
    runs = []
    for path in paths.values():
        it = Corpus(DataConfig(seq_len=31, batch_size=4, corpus=path, val_fraction=0.0, seed=3)).train_iterator()
        runs.append([np.asarray(next(it)) for _ in range(6)])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)
    # training batches are shuffled: not the in-order stream, but drawn from the same tokens
    first = runs[0][0].reshape(-1)
    assert not np.array_equal(first, np.concatenate([byte_doc(t) for t in TEXTS])[:len(first)])


def test_iterator_state_resumes_the_same_batches(tmp_path):
    path = write_formats(tmp_path)["parquet"]
    corpus = Corpus(DataConfig(seq_len=31, batch_size=4, corpus=path, val_fraction=0.0))
    it = corpus.train_iterator()
    for _ in range(5):                       # rows of ~7 documents: some rows are past their first epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))              # what the checkpoint stores
    expected = [np.asarray(next(it)) for _ in range(4)]
    resumed = corpus.train_iterator(state)
    for e in expected:
        np.testing.assert_array_equal(np.asarray(next(resumed)), e)


def test_hosts_split_the_global_batch_by_rows(tmp_path):
    """Two hosts load disjoint halves of the rows; together they are exactly the one-host global batch."""
    path = write_formats(tmp_path)["jsonl"]
    cfg = DataConfig(seq_len=15, batch_size=4, corpus=path, val_fraction=0.0)
    whole = Corpus(cfg).train_iterator()
    hosts = [Corpus(cfg, process_index=i, process_count=2).train_iterator() for i in range(2)]
    for _ in range(3):
        parts = [np.asarray(next(h)) for h in hosts]
        assert parts[0].shape == (2, 16)
        np.testing.assert_array_equal(np.concatenate(parts), np.asarray(next(whole)))
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        Corpus(cfg, 0, 3)
    with pytest.raises(ValueError, match="fewer than batch_size 64"):
        Corpus(DataConfig(batch_size=64, corpus=path, val_fraction=0.0)).train_iterator()


def test_stdlib_split_is_by_file_and_disjoint():
    corpus = Corpus(DataConfig())
    train, val = corpus.splits["train"], corpus.splits["validation"]
    assert len(train) > 10 * len(val) > 0
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    batch = corpus.validation_batches(1)[0]
    assert batch.shape == (16, 257) and batch.max() < 259 and (batch == 1).any()


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("\n".join(json.dumps({"text": t}) for t in ["hello world", "world hello hello"]))
    cfg = DataConfig(seq_len=7, batch_size=1, corpus=str(corpus_file), val_corpus=str(corpus_file),
                     tokenizer=str(tmp_path))
    (batch,) = Corpus(cfg).validation_batches(1)
    np.testing.assert_array_equal(batch[0], [2, 3, 1, 3, 2, 2, 1, 0])     # eos '</s>' found; the tail is padding
    del vocab["</s>"]
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="set train.data.eos_id"):
        Corpus(cfg)
    assert Corpus(DataConfig(corpus=str(corpus_file), tokenizer=str(tmp_path), eos_id=0)).tokenize.eos == 0


def test_bad_corpus_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Documents(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        Documents(str(tmp_path / "*.parquet"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format"):
        Documents(str(tmp_path / "data.csv"))
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(KeyError, match="no 'text' field.*text_key"):
        Documents(str(tmp_path / "bad.jsonl"))[0]
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Corpus(DataConfig(tokenizer=str(tmp_path / "nope.json")))
