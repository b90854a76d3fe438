"""What an adversarial user does, and what must happen: nothing they own is lost or half-overwritten (writers
swap a complete temporary sibling in; injected disk-full failures leave the old copy loadable), corrupt
checkpoints are detected with an explicit way back, signals save the current step, and bad input gets one
error line (no traceback) with a non-zero exit."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import SMALL, make

from nemojax import load_hf, load_orbax, save_hf, save_orbax
from nemojax.cli import main
from nemojax.config import ConfigError, ModelConfig
from nemojax.convert.hf import CheckpointError
from nemojax.fs import replace_directory
from nemojax.generate import generate, stream_generate
from nemojax.model import NemotronH
from nemojax.speculative import speculative_generate
from nemojax.train.trainer import TrainingError, TrainingInterrupted, _signals_caught, load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.from_yaml("configs/tiny.yaml").replace(hidden_size=64, intermediate_size=96, mamba_num_heads=4,
                                                        mamba_head_dim=16, ssm_state_size=16, head_dim=16)
IDS = jnp.asarray(np.arange(24).reshape(2, 12) % 300, jnp.int32)


def model(seed: int) -> NemotronH:
    return NemotronH(CFG, nnx.Rngs(seed))


def logits(m) -> np.ndarray:
    return np.asarray(m(IDS))


def cli(*argv, limit_bytes: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`nemojax argv` in a subprocess, optionally with files capped at limit_bytes (a full disk: writes fail)."""
    code = ("import resource, signal, sys\n"
            + (f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n" if limit_bytes else "")
            + "from nemojax.cli import main\nsys.exit(main())\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    if limit_bytes:                           # the compilation cache's own writes would hit the cap too
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() and line.startswith("nemojax")]
    assert proc.returncode not in (0, 1), (proc.returncode, proc.stderr[-2000:])       # 1 = a Python traceback
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and all(n in lines[-1] for n in needles), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An HF checkpoint (seed 1, with a tokenizer file) and an Orbax model (seed 2)."""
    root = tmp_path_factory.mktemp("owned")
    save_hf(model(1), str(root / "hf"))
    (root / "hf" / "tokenizer.json").write_text("{}")
    save_orbax(model(2), str(root / "orbax"))
    return root


# ------------------------------------------------------------------------------------------ writers

def test_every_writer_refuses_a_non_empty_target_without_force(dirs, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    m = model(3)
    for write in (lambda: save_hf(m, str(target)), lambda: save_orbax(m, str(target))):
        with pytest.raises(FileExistsError, match="not empty; pass --force"):
            write()
    for argv in (("convert", "hf-to-orbax", dirs / "hf", target), ("convert", "orbax-to-hf", dirs / "orbax", target),
                 ("pack", dirs / "orbax", target)):
        assert main(list(map(str, argv))) == 2
        assert "not empty; pass --force" in capsys.readouterr().err
    # --force replaces model directories only, and never one holding the source
    with pytest.raises(FileExistsError, match="not a model directory"):
        save_orbax(m, str(target), force=True)
    assert main(["convert", "hf-to-orbax", str(dirs / "hf"), str(dirs), "--force"]) == 2
    assert f"refusing to replace {dirs}: it holds {dirs / 'hf'}" in capsys.readouterr().err
    assert os.listdir(target) == ["notes.txt"] and os.path.isdir(dirs / "hf")


def test_replacing_through_a_symlink_and_without_an_atomic_exchange(tmp_path, monkeypatch):
    """A symlinked target is replaced where it points. Where renameat2 is missing the swap is two renames; if
    the second fails the old copy is put back."""
    from nemojax import fs

    real = tmp_path / "real"
    save_orbax(model(3), str(real))
    (tmp_path / "link").symlink_to(real)
    save_orbax(model(4), str(tmp_path / "link"), force=True)
    assert (tmp_path / "link").is_symlink()
    np.testing.assert_array_equal(logits(load_orbax(str(real))), logits(model(4)))
    monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    save_orbax(model(5), str(real), force=True)
    np.testing.assert_array_equal(logits(load_orbax(str(real))), logits(model(5)))
    rename = os.rename

    def second_rename_fails(a, b):
        if b == str(real) and ".writing-" in str(a) and not str(a).endswith(".old"):
            raise OSError(28, "No space left on device")
        rename(a, b)

    monkeypatch.setattr(fs.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match=f"writing {real} failed .No space left on device.; {real} is unchanged"):
        save_orbax(model(6), str(real), force=True)
    np.testing.assert_array_equal(logits(load_orbax(str(real))), logits(model(5)))
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_partial_writes_of_killed_writers_are_swept_and_nothing_else(tmp_path):
    """A writer killed mid-write (SIGKILL, power loss) leaves its temporary sibling behind; the next write of the
    same target removes it when it was this host's and its process is gone, and leaves every other sibling:
    a live writer's, another host's (shared filesystems), a stranded `.old` copy (a user's previous model) and
    the older unnamed form."""
    import socket

    host = socket.gethostname()
    done = subprocess.Popen(["true"])
    done.wait()                                            # a pid that no longer runs
    names = {"dead": f".m.writing-{host}-{done.pid}-abc", "alive": f".m.writing-{host}-{os.getpid()}-abc",
             "other_host": f".m.writing-elsewhere.example-{done.pid}-abc",
             "old_copy": f".m.writing-{host}-{done.pid}-abc.old", "unnamed": ".m.writing-x1y2"}
    for name in names.values():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    save_orbax(NemotronH(ModelConfig.from_yaml("configs/tiny.yaml"), nnx.Rngs(0)), str(tmp_path / "m"))
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left
    assert {names[k] for k in ("alive", "other_host", "old_copy", "unnamed")} | {"m"} == left


def test_orbax_to_hf_force_replaces_a_sharded_directory_whole(dirs, tmp_path):
    """Old shards and index used to stay beside the new files (nemojax then loaded the old weights)."""
    target = tmp_path / "hf_out"
    save_hf(model(5), str(target), max_shard_size="100KB")                  # several shards + an index
    assert len([f for f in os.listdir(target) if f.endswith(".safetensors")]) > 1
    assert main(["convert", "orbax-to-hf", str(dirs / "orbax"), str(target), "--force"]) == 0
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    np.testing.assert_array_equal(logits(load_hf(str(target), dt_clamp="none")),
                                  logits(load_orbax(str(dirs / "orbax"))))


def test_hf_to_orbax_force_over_a_packed_model_leaves_no_stale_pack_file(dirs, tmp_path):
    packed = tmp_path / "packed"
    assert main(["pack", str(dirs / "orbax"), str(packed)]) == 0
    assert main(["convert", "hf-to-orbax", str(dirs / "hf"), str(packed), "--force"]) == 0
    assert "nemojax_pack.json" not in os.listdir(packed) and "tokenizer.json" in os.listdir(packed)
    np.testing.assert_array_equal(logits(load_orbax(str(packed))), logits(load_hf(str(dirs / "hf"))))


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_a_full_disk_leaves_the_old_copy_whole(dirs, tmp_path, direction):
    """--force over an existing model with files capped at 64 KB: the write fails, the old model still loads
    unchanged and no temporary is left behind."""
    target = tmp_path / "existing"
    old = model(7)
    (save_orbax if direction == "hf-to-orbax" else save_hf)(old, str(target))
    before = sorted(os.listdir(target))
    src = dirs / ("hf" if direction == "hf-to-orbax" else "orbax")
    proc = cli("convert", direction, src, target, "--force", limit_bytes=64 << 10)
    one_line_error(proc, "File too large", f"{target} is unchanged")
    assert sorted(os.listdir(target)) == before and os.listdir(tmp_path) == ["existing"]
    reload = load_orbax if direction == "hf-to-orbax" else lambda path: load_hf(path, dt_clamp="none")
    np.testing.assert_array_equal(logits(reload(str(target))), logits(old))


def test_a_failed_write_is_removed_even_while_its_library_still_writes(tmp_path):
    """Orbax raises on the first failed array while tensorstore still writes the others on its own threads;
    they create their directories again after a single rmtree (a CI run left `.NAME.writing-*` behind this
    way). The temporary is removed once the late writes have landed, and the error still names the target."""
    target, late_write = tmp_path / "m", threading.Event()

    def still_writing(tmp):
        time.sleep(0.1)                                   # after the failure has been raised
        os.makedirs(os.path.join(tmp, "params", "ocdbt.process_0", "d"))
        open(os.path.join(tmp, "params", "ocdbt.process_0", "d", "late"), "wb").write(b"x")
        late_write.set()

    with pytest.raises(OSError, match=f"writing {target} failed .*nothing was written"):
        with replace_directory(str(target)) as tmp:
            threading.Thread(target=still_writing, args=(tmp,)).start()
            raise OSError(27, "File too large")
    assert late_write.wait(10) and os.listdir(tmp_path) == []


def test_files_are_written_with_normal_permissions(dirs):
    umask = os.umask(0)
    os.umask(umask)
    for sub in ("hf", "orbax"):
        for root, _, files in os.walk(dirs / sub):
            for name in files:
                assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~umask, (root, name)


# ------------------------------------------------------------------------------------------ training checkpoints

def _flip_bytes(step_dir: str) -> None:
    """Overwrites bytes in the middle of the largest array-data file of a checkpoint step's train state."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.path.basename(r) == "d"]
    biggest = max(files, key=os.path.getsize)
    data = bytearray(open(biggest, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    open(biggest, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_damaged_latest_checkpoint_is_reported_and_previous_resumes(tmp_path, corpus, damage):
    make(tmp_path, corpus, "train.steps=10").run(stop_after=10, progress=False)       # checkpoints 5 and 10
    step_dir = os.path.join(tmp_path, "checkpoints", "10")
    if damage == "flipped bytes":
        _flip_bytes(step_dir)
    else:
        for root, _, files in os.walk(os.path.join(step_dir, "state")):
            for f in files:
                path = os.path.join(root, f)
                if os.path.getsize(path) > 1024:
                    os.truncate(path, os.path.getsize(path) // 3)
    with pytest.raises(CheckpointError, match="checkpoint step 10 .*(corrupt|cannot be read).*resume_from=previous"):
        make(tmp_path, corpus, "train.steps=12").run(progress=False)
    if damage == "truncated":                     # the CLI: one line, no Orbax tracebacks
        proc = cli("train", "--config", "configs/tiny.yaml", "--no-progress", *SMALL, "train.steps=12",
                   f"train.ckpt_dir={tmp_path}")
        one_line_error(proc, "nemojax train: error: checkpoint step 10", "train.resume_from=previous")
    history = make(tmp_path, corpus, "train.steps=12", "train.resume_from=previous").run(progress=False)
    assert history[0]["step"] == 6 and history[-1]["step"] == 12
    # the damaged step was set aside (kept), so step 10 could be saved again
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "12"]
    assert [n.split("-")[0] for n in os.listdir(tmp_path / "checkpoints-set-aside")] == ["10"]
    make(tmp_path, corpus, "train.steps=13").run(progress=False)     # resumes from the new step 12


def test_checkpoint_integrity_detects_changed_and_non_finite_arrays(tmp_path, monkeypatch):
    """Deterministic damage the fingerprints must catch (flipped bytes in a compressed array file usually fail
    decoding first): step 2's stored arrays differ from its saved fingerprints by one element, step 3 holds a
    NaN."""
    from nemojax.train import checkpoint

    state = {"w": jnp.arange(1000, dtype=jnp.float32).reshape(10, 100), "b": jnp.ones(3, jnp.bfloat16)}
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=5)
    ckpt.save(1, state, {"pos": 1})
    real = checkpoint.fingerprints
    monkeypatch.setattr(checkpoint, "fingerprints", lambda t: real({**t, "w": t["w"].at[3, 7].add(1.0)}))
    ckpt.save(2, state, {"pos": 2})
    monkeypatch.undo()
    ckpt.save(3, {**state, "w": state["w"].at[0, 0].set(jnp.nan)}, {"pos": 3})
    ckpt.wait()
    target = jax.tree.map(jnp.zeros_like, state)
    restored, data = ckpt.restore(1, target)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert data == {"pos": 1}
    with pytest.raises(CheckpointError, match=r"step 2 .* is corrupt: 1 arrays differ from what was saved "
                                              r"\(e.g. \['w'\]\); .*resume_from=1 "):
        ckpt.restore(2, target)
    with pytest.raises(CheckpointError, match=r"step 3 .* is corrupt: 1 arrays hold NaN or Inf \(e.g. \['w'\]\); "
                                              r".*resume_from=previous "):
        ckpt.restore(3, target)
    assert ckpt.last_good() == 1                   # step 3 was saved non-finite, step 2 failed verification
    ckpt.close()


def test_a_step_listed_but_not_finalized_is_not_last_good(tmp_path, monkeypatch):
    """Orbax lists a step from the moment its asynchronous save starts, and keeps listing it when the save fails
    (the race behind a CI failure: 'Last good checkpoint: step 4' for a step whose files could not be written).
    Only a step whose directory is finalized on disk counts."""
    from nemojax.train import checkpoint

    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=5)
    ckpt.save(1, {"w": jnp.ones(4)}, {"pos": 1})
    ckpt.wait()
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000").mkdir()    # a save that never finished
    ckpt.finite[2] = True
    monkeypatch.setattr(ckpt, "steps", lambda: [1, 2])
    assert ckpt.last_good() == 1
    ckpt.close()


def test_changed_architecture_on_resume_is_one_clear_error(tmp_path, corpus):
    make(tmp_path, corpus, "train.steps=5").run(progress=False)
    with pytest.raises(ConfigError, match=r"another architecture \(intermediate_size 128 -> 64\)"):
        make(tmp_path, corpus, "train.steps=10", "model.intermediate_size=64").run(progress=False)
    os.remove(tmp_path / "run.json")          # checkpoints from before run records: the shapes still catch it
    with pytest.raises(CheckpointError, match="different model or optimizer.*train with the config it was saved"):
        make(tmp_path, corpus, "train.steps=10", "model.intermediate_size=64").run(progress=False)


def test_nan_stop_names_the_last_verified_checkpoint(tmp_path, corpus):
    trainer = make(tmp_path, corpus, "train.steps=12")
    with pytest.raises(TrainingError, match="at step 8; .*Last good checkpoint: step 5 in"):
        trainer.run(progress=False, loss_hook=lambda step, loss: float("nan") if step == 8 else loss)
    with pytest.raises(TrainingError, match="at step 2; .*No verified checkpoint in"):
        make(tmp_path / "fresh", corpus, "train.steps=12").run(
            progress=False, loss_hook=lambda step, loss: float("nan") if step == 2 else loss)


def test_a_failed_asynchronous_save_stops_training_and_keeps_the_previous_checkpoint(tmp_path):
    """The checkpoint of step 4 cannot be written (files capped after step 2's): training stops at the next
    step with the error instead of running on, and step 2's checkpoint is still there."""
    script = f"""
import resource, signal, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from train_helpers import make
from nemojax.train.data import Corpus
from nemojax.train.trainer import TrainingError
overrides = ("train.steps=8", "train.save_every=2", "train.eval_every=100")
make({str(tmp_path)!r}, None, *overrides).run(stop_after=2, progress=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))
try:
    make({str(tmp_path)!r}, None, *overrides).run(progress=False)
except TrainingError as e:
    print("STOPPED", e)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)       # its capped writes would leave truncated cache entries
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)
    assert "STOPPED saving a checkpoint failed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    stopped_at = int(proc.stdout.split("stopped at step ")[1].split(".")[0])
    assert 4 < stopped_at < 8
    assert "Last good checkpoint: step 2" in proc.stdout
    assert "2" in os.listdir(tmp_path / "checkpoints")
    history = make(tmp_path, None, "train.steps=8", "train.save_every=2", "train.eval_every=100").run(progress=False)
    assert history[0]["step"] == 3 and sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "8"]   # no leftovers


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_current_step_and_exits_with_one_line(tmp_path, sig):
    """The step in progress finishes, is saved, and the run exits 128 + signum with one line."""
    ckpt = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.yaml", "--no-progress", *SMALL, "train.steps=100000",
            "train.save_every=100000", "train.log_every=1", "train.eval_every=100000", f"train.ckpt_dir={ckpt}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "nemojax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = ckpt / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:        # in the loop: steps logged
            break
        time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"nemojax train: {sig.name} at step ") and "saved a checkpoint" in line, err[-2000:]
    step = int(line.split("at step ")[1].split(":")[0])
    assert str(step) in os.listdir(ckpt / "checkpoints")


def test_a_second_signal_aborts_at_once():
    """(In this process: two signals sent to a child coalesce when they arrive together.)"""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="aborted by a second SIGTERM") as second:
        with _signals_caught() as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)                                      # the handler runs between bytecodes
            assert caught == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert second.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before               # the previous handler is back


def test_a_resumed_run_logs_each_step_once(tmp_path, corpus):
    make(tmp_path, corpus, "train.steps=10", "train.log_every=1").run(stop_after=5, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:          # logged after the last checkpoint, then killed
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (6, 7))
        f.write('{"step": 8, "lo')                               # mid-write
    make(tmp_path, corpus, "train.steps=10", "train.log_every=1").run(progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 10


# ------------------------------------------------------------------------------------------ bad input

def test_generation_settings_and_token_ids_are_checked_everywhere(dirs, tmp_path):
    m = model(1)
    bad = [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0),
           dict(max_new_tokens=-5)]
    for kwargs in bad:
        for fn in (generate, stream_generate):
            with pytest.raises(ValueError, match=next(iter(kwargs))):
                fn(m, [[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})
    for ids in ([[1, 5000, 7]], [[1, -1, 7]]):
        with pytest.raises(ValueError, match="token ids must be in"):
            generate(m, ids, 2)
    mtp = NemotronH(CFG.replace(num_nextn_predict_layers=1, mtp_pattern="*-"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(mtp, [[1, 2]], max_new_tokens=0)
    for flags in (["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "0"],
                  ["--max-new-tokens", "-5"]):
        proc = cli("generate", "--model", dirs / "orbax", "--prompt", "hi", *flags)
        one_line_error(proc, "nemojax generate: error:")


def test_damaged_weights_and_insane_configs_are_refused_on_conversion(tmp_path):
    from safetensors.numpy import load_file, save_file

    bad_eps = tmp_path / "eps"
    save_hf(model(1), str(bad_eps))
    cfg = json.loads((bad_eps / "config.json").read_text())
    (bad_eps / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": -1}))
    with pytest.raises(ConfigError, match="layer_norm_epsilon must be > 0"):
        load_hf(str(bad_eps))
    (bad_eps / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": float("nan")}))
    with pytest.raises(ConfigError, match="layer_norm_epsilon must be > 0.0, got nan"):
        load_hf(str(bad_eps))
    nan = tmp_path / "nan"
    save_hf(model(1), str(nan))
    tensors = load_file(str(nan / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("norm_f.weight"))
    save_file({**tensors, name: np.full_like(tensors[name], np.nan)}, str(nan / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="norm_f.weight .* non-finite values"):
        load_hf(str(nan))
    one_line_error(cli("convert", "hf-to-orbax", nan, tmp_path / "out"), "non-finite")
    damaged = model(1)
    damaged.norm_f.weight.value = damaged.norm_f.weight.value.at[3].set(jnp.inf)
    save_orbax(damaged, str(tmp_path / "orbax_nan"))
    with pytest.raises(CheckpointError, match="norm_f.weight in .* holds non-finite values"):
        load_orbax(str(tmp_path / "orbax_nan"))
    one_line_error(cli("convert", "orbax-to-hf", tmp_path / "orbax_nan", tmp_path / "out"), "non-finite")
    assert not (tmp_path / "out").exists()


def test_corpus_checks(tmp_path):
    from nemojax.train.data import Corpus

    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.warns(UserWarning, match="skipped 1 of 1"), pytest.raises(FileNotFoundError, match="no UTF-8 text"):
        Corpus(load_run_config("configs/tiny.yaml", SMALL + (f"train.data.corpus={binary}",))[1].data).splits
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("short text " * 5)
    (texts / "b.txt").write_bytes(b"\x00\xff" * 100)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        corpus = Corpus(load_run_config("configs/tiny.yaml", SMALL + (
            f"train.data.corpus={texts}", f"train.data.val_corpus={texts / 'a.txt'}"))[1].data)
        with pytest.raises(ValueError, match=r"validation split \(1 documents, \d+ tokens\) is too small .* 65"):
            corpus.validation_batches(2)


def test_config_and_path_mistakes_are_one_line_errors(dirs, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "a_file").write_text("x")
    train = ["train", "--config"]
    cases = [
        (train + ["configs/tiny.yaml", "train.save_every=0"], "train.save_every must be >= 1"),
        (train + ["configs/tiny.yaml", "train.data.batch_size=0"], "batch_size must be >= 1"),
        (train + ["configs/tiny.yaml", "train.data.seq_len=-5"], "seq_len must be >= 1"),
        (train + ["configs/tiny.yaml", f"train.ckpt_dir={tmp_path / 'a_file'}"], "is a file, not a directory"),
        (train + [str(tmp_path / "empty.yaml")], "expected a non-empty mapping"),
        (train + [str(tmp_path / "broken.yaml")], "is not valid YAML"),
        (["generate", "--model", str(tmp_path / "a_file"), "--prompt", "x"], "is not a directory"),
        (["convert", "orbax-to-hf", str(tmp_path / "a_file"), str(tmp_path / "o")], "is not a nemojax Orbax"),
    ]
    packed = tmp_path / "packed"
    assert main(["pack", str(dirs / "orbax"), str(packed)]) == 0
    cases.append((["pack", str(packed), str(tmp_path / "again")], "already a packed model"))
    for argv, needle in cases:
        one_line_error(cli(*argv), needle)
