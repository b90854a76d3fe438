"""Bad checkpoints give specific errors, never silently wrong numbers."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")
from hf_helpers import build_hf_model, save_hf_model  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from nemojax import CheckpointError, ConfigError, load_hf  # noqa: E402


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_hf_model(build_hf_model(seed=11), tmp_path_factory.mktemp("good"))


def edited_copy(good_dir, tmp_path, edit):
    shutil.copytree(good_dir, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(tmp_path / "ckpt")


def test_missing_tensor(good_dir, tmp_path):
    d = edited_copy(good_dir, tmp_path, lambda t: t.pop("backbone.layers.0.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*layers\.0\.mixer\.A_log"):
        load_hf(d)


def test_wrong_shape(good_dir, tmp_path):
    def edit(t):
        t["backbone.layers.1.mixer.q_proj.weight"] = np.zeros((5, 48), np.float32)
    d = edited_copy(good_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"wrong shape.*layers\.1\.mixer\.q_proj\.weight: checkpoint \(5, 48\) "
                                              r"vs expected \(48, 48\)"):
        load_hf(d)


def test_unexpected_tensor(good_dir, tmp_path):
    def edit(t):
        t["backbone.layers.2.mixer.gate_proj.weight"] = np.zeros((3, 3), np.float32)
    d = edited_copy(good_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*layers\.2\.mixer\.gate_proj\.weight"):
        load_hf(d)


def test_all_problems_reported_together(good_dir, tmp_path):
    def edit(t):
        t.pop("lm_head.weight")
        t["backbone.norm_f.weight"] = np.zeros((7,), np.float32)
    d = edited_copy(good_dir, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        load_hf(d)
    assert "lm_head.weight" in str(info.value) and "norm_f.weight: checkpoint (7,)" in str(info.value)


def test_bad_pattern_character_in_config_json(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("layers_block_type")
    cfg["hybrid_override_pattern"] = "M*-Q-*M"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unknown layer character 'Q' at position 3"):
        load_hf(str(tmp_path / "ckpt"))


def test_corrupt_safetensors_file(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt safetensors file .*model.safetensors"):
        load_hf(str(tmp_path / "ckpt"))


def test_truncated_safetensors_file(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_hf(str(tmp_path / "ckpt"))


def test_pickle_checkpoints_are_refused(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").rename(tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors files.*pickled"):
        load_hf(str(tmp_path / "ckpt"))


def test_index_pointing_at_missing_shard(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        load_hf(str(tmp_path / "ckpt"))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
