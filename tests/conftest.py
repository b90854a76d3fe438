import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    """One stdlib corpus index shared by a module's training tests (documents are read lazily)."""
    from train_helpers import SMALL

    from nemojax.train.data import Corpus
    from nemojax.train.trainer import load_run_config

    return Corpus(load_run_config("configs/tiny.yaml", SMALL)[1].data)
