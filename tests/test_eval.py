"""`nemojax eval` (issue 17): perplexity and bits per byte against transformers on the same tiny checkpoint and
text, with the windows rebuilt here independently (byte tokens, non-overlapping windows sharing a boundary)."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("transformers")
from hf_helpers import build_hf_model, save_hf_model  # noqa: E402

from nemojax.cli import main  # noqa: E402

TEXTS = ["def f(x):\n    return x * 2\n", "héllo wörld — unicode bytes", "a" * 40]


def hf_total_nll(model, tokens: list[int], seq_len: int) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start:start + seq_len + 1]
        with torch.no_grad():
            logits = model(torch.tensor([window[:-1]])).logits.double()
        logp = torch.log_softmax(logits[0], dim=-1)
        total -= float(logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum())
        count += len(window) - 1
    return total, count


def test_perplexity_and_bits_per_byte_equal_transformers(tmp_path, capsys):
    hf = build_hf_model(seed=11, vocab_size=320)
    directory = save_hf_model(hf, tmp_path / "hf")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    bos, eos = hf.config.bos_token_id, hf.config.eos_token_id
    stream = [t for text in TEXTS for t in [bos, *(b + 3 for b in text.encode()), eos]]
    seq_len = 16
    assert main(["eval", "--model", directory, "--corpus", str(corpus), "--seq-len", str(seq_len), "--batch", "3",
                 "--max-tokens", "100000", "--tokenizer", "byte", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total, count = hf_total_nll(hf, stream, seq_len)
    assert got["tokens"] == count == len(stream) - 1 and got["documents"] == 3
    assert got["bytes"] == sum(len(t.encode()) for t in TEXTS)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-4), (got, math.exp(total / count))
    assert math.isclose(got["bits_per_byte"], total / math.log(2) / got["bytes"], rel_tol=1e-4)


def test_eval_refuses_a_tokenizer_outside_the_vocabulary_and_an_empty_corpus(tmp_path, capsys):
    directory = save_hf_model(build_hf_model(seed=12), tmp_path / "hf")        # vocab 97 < byte ids
    (tmp_path / "a.txt").write_text("some text")
    assert main(["eval", "--model", directory, "--corpus", str(tmp_path / "a.txt"), "--tokenizer", "byte",
                 "--no-progress"]) == 2
    assert "outside the model's vocabulary of 97" in capsys.readouterr().err
    np.testing.assert_equal(main(["eval", "--model", directory, "--corpus", str(tmp_path / "missing.txt"),
                                  "--tokenizer", "byte"]), 2)
    assert "does not exist" in capsys.readouterr().err
