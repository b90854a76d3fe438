"""Every notebook in colab/ runs top to bottom with nbclient (issue 17), as a user would run it: in a fresh
directory, with nemojax already installed (the install cell then does nothing), at CI size
(NEMOJAX_NOTEBOOK_STEPS), and twice in one kernel where it must be idempotent (the quantized-training one
once: see ONCE). The TPU notebook runs on 4 simulated CPU devices with its tiny checkpoint."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
ENV = {"tpu_sharded_inference": {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}}
# The quantized-training notebook trains five runs: its second pass (~150 s of CI) is left out; it writes only
# into fresh temporary directories like the others, which run twice.
ONCE = {"quantized_training"}


def test_the_notebooks_are_the_ones_documented():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "quantized_training.ipynb", "tpu_sharded_inference.ipynb"} <= names
    for path in NOTEBOOKS:
        source = "".join("".join(c.source) for c in nbformat.read(path, as_version=4).cells)
        assert "<org>" not in source and "NEMOJAX_SOURCE" in source, path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p)[:-6])
def test_notebook_runs_top_to_bottom_twice(path, tmp_path, monkeypatch):
    name = os.path.basename(path)[:-6]
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("NEMOJAX_NOTEBOOK_STEPS", "6")
    monkeypatch.delenv("NEMOJAX_SOURCE", raising=False)
    for key, value in ENV.get(name, {}).items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    again = [] if name in ONCE else [c.copy() for c in nb.cells if c.cell_type == "code"]
    twice = nbformat.v4.new_notebook(cells=nb.cells + again, metadata=nb.metadata)
    client = nbclient.NotebookClient(twice, kernel_name="python3", timeout=1200,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                      # raises CellExecutionError with the failing cell and its traceback
    text = "".join(o.get("text", "") for c in twice.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name == "tpu_sharded_inference":
        assert text.count("tokens equal to single-device decoding: 100%") == 2, text[-2000:]
        assert "'tensor': 2" in text
