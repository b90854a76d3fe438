"""The TPU compile tier's one requirement: libtpu (skipped without it, except in CI, where it fails)."""

import os

import pytest

from pallas_kernels import aot


def need_libtpu() -> None:
    if not aot.libtpu_available():
        if os.environ.get("CI"):
            pytest.fail("the TPU compile tier needs libtpu in CI (pip install -e '.[tpu]')")
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
