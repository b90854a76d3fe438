"""Everyday command-line use (issue 17): Hub ids resolved in the local Hugging Face cache only, the tokenizer rule
(an HF checkpoint without tokenizer.json is an error, not garbage), --prompt-file batches, --version, option
defaults in --help, generation_config.json on HF export."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import ModelConfig, NemotronH, save_hf, save_orbax
from nemojax.cli import build_parser, main
from nemojax.convert.auto import load_model

CFG = ModelConfig.from_yaml("tiny").replace(hidden_size=64, intermediate_size=96, mamba_num_heads=4,
                                            mamba_head_dim=16, ssm_state_size=16, head_dim=16)


@pytest.fixture(scope="module")
def tiny():
    return NemotronH(CFG, nnx.Rngs(0))


def test_hub_ids_load_from_the_local_cache_only(tmp_path, tiny, monkeypatch, capsys):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    save_hf(tiny, str(cache / "models--acme--tiny" / "snapshots" / revision))
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    ids = jnp.asarray([[1, 40, 41, 42]])
    np.testing.assert_allclose(np.asarray(load_model("acme/tiny")(ids)), np.asarray(tiny(ids)), rtol=1e-6, atol=1e-6)
    # the checkpoint has no tokenizer.json: an error naming the fix, unless the byte-level tokenizer is asked for
    assert main(["generate", "--model", "acme/tiny", "--prompt", "def ", "--max-new-tokens", "3"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", "acme/tiny", "--prompt", "def ", "--max-new-tokens", "3",
                 "--tokenizer", "byte", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["generate", "--model", "acme/other", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no snapshot of the Hub model 'acme/other' is in the local Hugging Face cache" in err
    assert "hf download acme/other" in err


def test_prompt_file_is_one_batch_with_the_completions_of_single_prompts(tmp_path, tiny, capsys, monkeypatch):
    save_orbax(tiny, str(tmp_path / "m"))                 # a nemojax model without tokenizer.json: byte-level
    prompts = ["def main(", "import os", "x = [i for i in range(10)]"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    common = ["--model", str(tmp_path / "m"), "--max-new-tokens", "6", "--ignore-eos"]
    assert main(["generate", *common, "--prompt-file", str(tmp_path / "prompts.txt")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(r["tokens"] == 6 for r in rows)
    for row in rows:
        assert main(["generate", *common, "--prompt", row["prompt"]]) == 0
        assert capsys.readouterr().out == row["prompt"] + row["completion"]
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts[0] + "\n" + prompts[1] + "\n"))     # --prompt-file -
    assert main(["generate", *common, "--prompt-file", "-"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows[:2]
    assert main(["generate", *common]) == 2
    assert "exactly one of --prompt and --prompt-file" in capsys.readouterr().err


def test_version_and_every_option_shows_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("nemojax ")
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = " ".join(sub.format_help().split())                   # help wraps with the terminal's width
        for action in sub._actions:
            assert action.help, (name, action.dest)                   # every option and argument is described
            if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and not action.required:
                assert f"default: {action.default}" in text or f"default {action.default}" in text, \
                    (name, action.option_strings)


def test_hf_export_writes_the_generation_config_transformers_reads(tmp_path, tiny):
    pytest.importorskip("transformers")
    from transformers import GenerationConfig

    save_hf(tiny, str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "hf" / "generation_config.json")
    gen = GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (CFG.bos_token_id, CFG.eos_token_id,
                                                                      CFG.pad_token_id)
