"""The lm-evaluation-harness adapter (issue 17): nemojax registered as an lm_eval model gives the loglikelihoods
of lm_eval's own transformers backend on the same tiny checkpoint (with a real BPE tokenizer), and a local
YAML task over a JSONL file scores the same under both backends, offline."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
from hf_helpers import build_hf_model, save_bpe_tokenizer, save_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random NemotronH with a byte-level BPE tokenizer."""
    directory = save_hf_model(build_hf_model(seed=21, vocab_size=320), tmp_path_factory.mktemp("lm") / "hf")
    save_bpe_tokenizer(directory)
    return directory


def requests(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def test_loglikelihoods_equal_the_transformers_backend(checkpoint):
    from lm_eval.models.huggingface import HFLM

    from nemojax.lm_eval_adapter import NemojaxLM

    pairs = [("def add(a, b):", "\n    return a + b"), ("The quick brown ", "fox"), ("", "Paris is the capital"),
             ("import numpy as np\nx = ", "np.zeros(3)"), ("Paris is the capital of", " France.")]
    ours = NemojaxLM(pretrained=checkpoint, batch_size=3, pad_to=16).loglikelihood(requests(pairs),
                                                                                    disable_tqdm=True)
    hf = HFLM(pretrained=checkpoint, device="cpu", dtype="float32", batch_size=2).loglikelihood(requests(pairs),
                                                                                                disable_tqdm=True)
    np.testing.assert_allclose([ll for ll, _ in ours], [ll for ll, _ in hf], rtol=1e-4, atol=1e-4)
    assert [g for _, g in ours] == [g for _, g in hf]


def test_a_local_yaml_task_scores_the_same_under_both_backends(checkpoint, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import nemojax.lm_eval_adapter  # noqa: F401  (registers "nemojax")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "capitals.jsonl"
    rows = [("France", ["Paris", "Rome", "Berlin"], 0), ("Italy", ["Madrid", "Rome", "Oslo"], 1),
            ("Norway", ["Oslo", "Paris", "Lima"], 0), ("Peru", ["Quito", "Bogota", "Lima"], 2)]
    data.write_text("".join(json.dumps({"country": c, "choices": ch, "label": y}) + "\n" for c, ch, y in rows))
    (tmp_path / "capitals.yaml").write_text(f"""task: nemojax_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The capital of {{{{country}}}} is"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    tasks = TaskManager(include_path=str(tmp_path))
    results = {}
    for name, args in (("nemojax", f"pretrained={checkpoint},batch_size=4,pad_to=16"),
                       ("hf", f"pretrained={checkpoint},dtype=float32,batch_size=4")):
        out = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["nemojax_capitals"], task_manager=tasks,
                                      device="cpu", log_samples=True)
        results[name] = out
    ours, hf = (results[n]["samples"]["nemojax_capitals"] for n in ("nemojax", "hf"))
    lls = [[float(r[0]) for r in s["resps"] for r in r] for s in ours]
    ref = [[float(r[0]) for r in s["resps"] for r in r] for s in hf]
    np.testing.assert_allclose(lls, ref, rtol=1e-4, atol=1e-4)
    assert results["nemojax"]["results"]["nemojax_capitals"]["acc,none"] == \
        results["hf"]["results"]["nemojax_capitals"]["acc,none"]


def test_generate_until_equals_the_transformers_backend(checkpoint):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nemojax.lm_eval_adapter import NemojaxLM

    asks = [("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}),
            ("The quick brown", {"until": ["."], "max_gen_toks": 12})]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=a, idx=i) for i, a in enumerate(asks)]
    ours = NemojaxLM(pretrained=checkpoint).generate_until(reqs, disable_tqdm=True)
    hf = HFLM(pretrained=checkpoint, device="cpu", dtype="float32", batch_size=1).generate_until(reqs,
                                                                                               disable_tqdm=True)
    assert ours == hf and any(ours), (ours, hf)
