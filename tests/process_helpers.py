"""Launching worker processes of multi-process tests and reading the RESULT line they print."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(worker: str, *args, xla_flags: str = "") -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, worker, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def result(proc: subprocess.Popen, timeout: int = 1800) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
