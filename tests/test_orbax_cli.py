"""`nemojax convert hf-to-orbax` / `orbax-to-hf` keep logits identical to the HF source."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
from hf_helpers import build_hf_model, hf_logits, random_ids, save_hf_model  # noqa: E402

from nemojax import load_hf, load_orbax  # noqa: E402
from nemojax.cli import main  # noqa: E402


def test_hf_to_orbax_to_hf_via_cli(tmp_path, capsys):
    from transformers import NemotronHForCausalLM

    model = build_hf_model(seed=31)
    src = save_hf_model(model, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    ids = random_ids(model.config.vocab_size, 2, 23)
    ref = hf_logits(model, ids)

    assert main(["convert", "hf-to-orbax", src, str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "tokenizer.json").exists()
    restored = np.asarray(load_orbax(str(tmp_path / "orbax"))(jnp.asarray(ids)))
    direct = np.asarray(load_hf(src)(jnp.asarray(ids)))
    np.testing.assert_array_equal(restored, direct)
    assert np.abs(restored - ref).max() <= 1e-4 * np.abs(ref).max()

    assert main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    back = NemotronHForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    np.testing.assert_array_equal(hf_logits(back, ids), ref)

    # refuses to overwrite an existing Orbax checkpoint without --force
    assert main(["convert", "hf-to-orbax", src, str(tmp_path / "orbax")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "hf-to-orbax", src, str(tmp_path / "orbax"), "--force"]) == 0


def test_orbax_bf16_cast(tmp_path):
    model = build_hf_model(seed=32)
    src = save_hf_model(model, tmp_path / "hf")
    assert main(["convert", "hf-to-orbax", src, str(tmp_path / "orbax"), "--dtype", "bfloat16"]) == 0
    m = load_orbax(str(tmp_path / "orbax"))
    assert m.config.param_dtype == "bfloat16" and m.lm_head.kernel[...].dtype == jnp.bfloat16
    m32 = load_orbax(str(tmp_path / "orbax"), dtype="float32")
    assert m32.lm_head.kernel[...].dtype == jnp.float32


def test_info_and_demo_commands(capsys):
    assert main(["info", "--config", "configs/nano_v2_12b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "Mamba-2 28, attention 6, MLP 28" in out and "parameters: 12,3" in out
    assert main(["demo", "--config", "configs/tiny.yaml", "--seq-len", "32"]) == 0
    assert "logits (2, 32, 320)" in capsys.readouterr().out


def test_orbax_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a nemojax Orbax checkpoint"):
        load_orbax(str(tmp_path))
