import dataclasses
import glob
import json
import os

import pytest

from nemojax.config import ConfigError, ModelConfig
from nemojax.convert.hf import param_count


def test_pattern_errors_name_the_character():
    with pytest.raises(ConfigError, match=r"unknown layer character 'X' at position 2"):
        ModelConfig(pattern="M*X-")
    with pytest.raises(ConfigError, match="non-empty"):
        ModelConfig(pattern="")


def test_inconsistent_values_raise():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(6\) must be divisible by num_key_value"):
        ModelConfig(pattern="*", num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ConfigError, match=r"mamba_num_heads \(6\) must be divisible by n_groups \(4\)"):
        ModelConfig(pattern="M", mamba_num_heads=6, n_groups=4)
    with pytest.raises(ConfigError, match="dt_clamp"):
        ModelConfig().replace(dt_clamp="sometimes")
    with pytest.raises(ConfigError, match="relu2"):
        ModelConfig(mlp_hidden_act="gelu")
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig(pattern="E", n_routed_experts=4, num_experts_per_tok=5, moe_intermediate_size=8)


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'hiden_size'.*did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 8})
    (tmp_path / "c.yaml").write_text("model:\n  pattern: M-\n  n_group: 1\n  ssm_state_sise: 4\n")
    with pytest.raises(ConfigError, match="ssm_state_sise.*ssm_state_size"):
        ModelConfig.from_yaml(str(tmp_path / "c.yaml"))


def test_legacy_hf_keys_are_read():
    legacy = {"model_type": "nemotron_h", "hybrid_override_pattern": "M-*", "mamba_n_groups": 2,
              "attention_head_dim": 16, "rms_norm_eps": 1e-6, "mamba_d_conv": 3, "mamba_chunk_size": 64,
              "num_hidden_layers": 3,
              "mamba_num_heads": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "use_bias": True,
              "mamba_dt_limit": [0.0, {"__float__": "Infinity"}], "rope_theta": 10000, "expand": 2}
    cfg = ModelConfig.from_hf_dict(legacy)
    assert (cfg.pattern, cfg.n_groups, cfg.head_dim, cfg.layer_norm_epsilon, cfg.conv_kernel,
            cfg.runtime.chunk_size) == ("M-*", 2, 16, 1e-6, 3, 64)
    assert cfg.mamba_proj_bias is True and cfg.time_step_limit == (0.0, float("inf"))
    assert cfg.runtime.dt_clamp == "none"  # the default: NVIDIA's reference and transformers >= 5.25


def test_layers_block_type_list_with_new_and_legacy_names():
    cfg = ModelConfig.from_hf_dict({"layers_block_type": ["mamba", "mlp", "attention", "linear_attention",
                                                           "full_attention", "moe"],
                                    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                                    "moe_shared_expert_intermediate_size": 8})
    assert cfg.pattern == "M-*M*E"
    with pytest.raises(ConfigError, match="unknown layer types.*'conv'"):
        ModelConfig.from_hf_dict({"layers_block_type": ["mamba", "conv"]})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf_dict({"hybrid_override_pattern": "M-", "num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="disagrees"):
        ModelConfig.from_hf_dict({"hybrid_override_pattern": "M-", "layers_block_type": ["mlp", "mamba"]})
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf_dict({"model_type": "llama", "hybrid_override_pattern": "M"})


def test_hf_config_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_yaml("configs/nano_v2_9b.yaml")
    cfg.save_hf_config(str(tmp_path))
    hf = transformers.NemotronHConfig.from_pretrained(str(tmp_path))
    assert hf.hybrid_override_pattern == cfg.pattern
    assert (hf.mamba_num_heads, hf.mamba_head_dim, hf.n_groups, hf.head_dim) == (128, 80, 8, 128)
    hf.save_pretrained(str(tmp_path / "hf"))
    back = ModelConfig.from_hf(str(tmp_path / "hf"), dt_clamp="none")
    # HF config.json carries the architecture only; runtime options (scan_layers, remat, ...) come from the
    # YAML or the command line, so they are compared apart from the architecture.
    assert back.runtime.dt_clamp == "none" and cfg.runtime.scan_layers and not back.runtime.scan_layers
    assert back.replace(runtime=cfg.runtime) == cfg
    json.loads((tmp_path / "config.json").read_text())  # strict JSON (no bare Infinity)


def test_every_yaml_config_loads_and_published_sizes_match():
    published = {  # total parameters of the HF checkpoints
        "nano_v2_12b": 12.31e9, "nano_v2_9b": 8.89e9, "nemotron_h_8b": 8.1e9,
        "nemotron_h_47b": 46.8e9, "nemotron_h_56b": 56.3e9,
    }
    seen = set()
    for path in glob.glob("configs/*.yaml"):
        name = path.split("/")[-1][:-5]
        cfg = ModelConfig.from_yaml(path)
        seen.add(name)
        if name in published:
            assert abs(param_count(cfg) / published[name] - 1) < 0.005, (name, param_count(cfg))
    assert {"tiny", "nemotron_h_4b", "nemotron_h_8b", "nano_v2_9b", "nano_v2_12b", "nemotron3_nano_30b_a3b",
            "nemotron3_super_120b_a12b", "tiny_moe"} <= seen


def test_nemotron3_totals_match_published():
    from nemojax.convert.hf import active_param_count

    nano = ModelConfig.from_yaml("configs/nemotron3_nano_30b_a3b.yaml")
    assert abs(param_count(nano) / 31.6e9 - 1) < 0.005                      # 31.6B total
    assert abs(active_param_count(nano) / 3.6e9 - 1) < 0.02                 # ~3.6B active (with embeddings)
    sup = ModelConfig.from_yaml("configs/nemotron3_super_120b_a12b.yaml")
    assert param_count(sup) == 123_611_033_088                              # checkpoint element count, MTP incl.
    assert abs(param_count(sup, include_mtp=False) / 120.7e9 - 1) < 0.005
    assert abs((active_param_count(sup) - 2 * sup.vocab_size * sup.hidden_size) / 12e9 - 1) < 0.05   # 12B active


def test_config_is_frozen_and_replace_validates():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
    with pytest.raises(ConfigError, match="unknown key"):
        cfg.replace(hidden=3)
    assert cfg.replace(dtype="bfloat16").runtime.dtype == "bfloat16"


def test_numbers_written_without_a_dot_are_numbers():
    from nemojax.train.trainer import load_run_config

    # YAML 1.1 reads 1e-3 as a string; config fields are typed, so it must arrive as a float
    model_cfg, train_cfg = load_run_config("configs/tiny.yaml", ("train.optim.lr=1e-3", "model.initializer_range=2e-2"))
    assert train_cfg.optim.lr == 0.001 and model_cfg.initializer_range == 0.02
    with pytest.raises(ConfigError, match="train.optim.lr must be float, got 'fast'"):
        load_run_config("configs/tiny.yaml", ("train.optim.lr=fast",))
    with pytest.raises(ConfigError, match="train.steps must be int, got 1.5"):
        load_run_config("configs/tiny.yaml", ("train.steps=1.5",))


def test_negative_loss_chunk_is_refused():
    from nemojax.train.trainer import load_run_config

    assert load_run_config("configs/tiny.yaml", ("train.loss_chunk_tokens=64",))[1].loss_chunk_tokens == 64
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens must be >= 0, got -1"):
        load_run_config("configs/tiny.yaml", ("train.loss_chunk_tokens=-1",))


def test_config_saved_before_the_runtime_section_still_reads(tmp_path):
    """Checkpoints written before RuntimeOptions had runtime keys beside the architecture and ssd_impl 'xla'."""
    from nemojax.convert.orbax import CONFIG_FILE, read_config

    cfg = ModelConfig.from_yaml("configs/tiny_moe.yaml").replace(remat="block", dtype="bfloat16")
    legacy = {**cfg.to_dict(), **cfg.to_dict()["runtime"], "ssd_impl": "xla", "time_step_limit": [0.0, "inf"]}
    del legacy["runtime"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(legacy))
    assert read_config(str(tmp_path)) == cfg.replace(ssd_impl="chunked")


def test_configs_resolve_by_bare_name_and_a_wrong_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    from nemojax.config import resolve_config, shipped_configs

    monkeypatch.chdir(tmp_path)                       # outside the repository: no ./configs here
    assert {"tiny", "tiny_moe", "nano_v2_12b", "nemotron3_super_120b_a12b"} <= set(shipped_configs())
    for spec in ("nano_v2_12b", "nano_v2_12b.yaml", "configs/nano_v2_12b.yaml"):
        assert ModelConfig.from_yaml(spec).hidden_size == 5120
    with pytest.raises(FileNotFoundError, match=r"did you mean 'nano_v2_12b'.*") as e:
        resolve_config("nano_v2_13b")
    assert "tiny_moe" in str(e.value) and "nemotron_h_56b" in str(e.value)
    (tmp_path / "tiny.yaml").write_text("model:\n  hidden_size: 64\n")     # a file of that name wins
    assert resolve_config("tiny.yaml") == "tiny.yaml"


def test_the_built_package_ships_its_configs(tmp_path):
    """What `pip install nemojax` gets: the wheel holds nemojax/configs/*.yaml, and `nemojax info --config NAME`
    from that install works in a directory without the repository."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"                            # a copy, so the build leaves nothing in the repository
    for name in ("nemojax", "pallas_kernels"):
        shutil.copytree(os.path.join(root, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, capture_output=True, timeout=600, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("nemojax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "nemojax/configs/nano_v2_12b.yaml" in names and "nemojax/configs/tiny.yaml" in names
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "import sys, nemojax.cli; assert 'site' in nemojax.cli.__file__; "
                           "sys.exit(nemojax.cli.main(['info', '--config', 'nano_v2_12b']))"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "parameters: 12,310,001,152" in proc.stdout, proc.stderr[-2000:]
