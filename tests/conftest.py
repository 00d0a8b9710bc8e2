"""The fixtures every test may ask for: a temporary download cache, a small synthetic corpus, quick configs.
Everything else the tests share is in tests/harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.harness import compose_train, write_corpus


@pytest.fixture(autouse=True, scope="session")
def cache_in_a_temporary_folder(tmp_path_factory):
    """Downloads and token caches made by the tests go to a temporary folder, not ~/.cache/shakespeare."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHAKESPEARE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def tiny_cfg(tmp_path: Path, corpus: Path):
    """A factory for quick configs: the small corpus, small batches, one short epoch, the bigram unless a
    `model=` override names another rung or an `experiment=` picks its own."""

    def make(*overrides: str) -> DictConfig:
        rung = [] if any(o.startswith(("model=", "experiment=")) for o in overrides) else ["model=bigram"]
        base = [
            *rung,
            f"data.path={corpus}",
            "data.batch_size=32",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=5",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
        ]
        return compose_train(tmp_path / "run", [*base, *overrides])

    return make
