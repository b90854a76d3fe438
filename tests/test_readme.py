"""README.md, followed as a new user follows it: every ```bash and ```python block, top to bottom, in one fresh
directory, after `make demo` (the Makefile's demo recipe). ```text blocks are synopses and are not run. The only
change is size: every `nemojax train` gets SHRINK appended (later overrides win), so the runs take seconds; each
command must succeed and each training run must actually train (its run directory holds a model). `nemojax eval`
and `nemojax prune` get SHRINK_FLAGS appended likewise (argparse keeps the last value)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SHRINK = ("train.steps=6", "train.save_every=3", "train.eval_every=3", "train.eval_batches=1", "train.log_every=3",
          "train.data.seq_len=32", "train.data.batch_size=2", "train.optim.warmup_steps=2")
SHRINK_FLAGS = {"eval": ("--max-tokens", "2048"), "prune": ("--calib-tokens", "1024")}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """[(language, body)] of the fenced code blocks, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(body: str) -> list[list[str]]:
    """The argv of each command of a bash block (backslash continuations joined, # comments dropped)."""
    return [argv for argv in map(lambda line: shlex.split(line, comments=True),
                                 body.replace("\\\n", " ").splitlines()) if argv]


def demo_recipe() -> list[list[str]]:
    """The commands of the Makefile's `demo` target, with $(VENV)/bin/ dropped (nemojax is on PATH)."""
    lines = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(shlex.split(line.replace("$(VENV)/bin/", "")))
    return recipe


def run(argv: list[str], cwd: str) -> None:
    if argv[0] == "nemojax" and argv[1] == "train":
        argv = [*argv, *SHRINK]
    elif argv[0] == "nemojax" and argv[1] in SHRINK_FLAGS:
        argv = [*argv, *SHRINK_FLAGS[argv[1]]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=BIN + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stderr[-3000:]}"
    if argv[:2] == ["nemojax", "train"]:
        ckpt = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("train.ckpt_dir=")),
                    "checkpoints/tiny")
        assert os.path.isdir(os.path.join(cwd, ckpt, "model")), f"{shlex.join(argv)} exported no model"
        assert "nothing to train" not in proc.stderr, f"{shlex.join(argv)} trained nothing:\n{proc.stderr}"


def test_readme_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = fenced_blocks(open(os.path.join(ROOT, "README.md")).read())
    assert {lang for lang, _ in blocks} <= {"bash", "python", "text"}, "a block in an unknown language"
    assert sum(lang == "python" for lang, _ in blocks) >= 2 and sum(lang == "bash" for lang, _ in blocks) >= 4
    monkeypatch.chdir(tmp_path)                                # python blocks run here, in this process
    namespace: dict = {}
    for n, (lang, body) in enumerate(blocks):
        if lang == "bash":
            for argv in shell_commands(body):
                if argv[0] == "make":
                    assert argv[1:] in (["demo"], ["test"]), argv
                    for command in demo_recipe() if argv[1] == "demo" else ():     # `make test` is this suite
                        run(command, str(tmp_path))
                else:
                    assert argv[0] == "nemojax", f"README block {n} runs {argv[0]!r}, which this test cannot"
                    run(argv, str(tmp_path))
        elif lang == "python":
            exec(compile(body, f"README.md python block {n}", "exec"), namespace)
    # the same command twice: the second finds the run finished and says so instead of training again
    again = subprocess.run([os.path.join(BIN, "nemojax"), "train", "--config", "tiny", *SHRINK], cwd=tmp_path,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0 and "already reached step 6 of 6: nothing to train" in again.stderr, again.stderr


@pytest.mark.parametrize("body,expected", [
    ('nemojax a --x "b c" \\\n    d  # note\n\nnemojax e', [["nemojax", "a", "--x", "b c", "d"], ["nemojax", "e"]]),
])
def test_shell_commands_parse_like_bash(body, expected):
    assert shell_commands(body) == expected
