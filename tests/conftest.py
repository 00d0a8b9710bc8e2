"""Shared fixtures: a small synthetic corpus and Hydra configs composed the way `train.py` composes them."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import shakespeare.cli.train  # noqa: F401  (registers the resolvers train.py's config uses, as train.py does)
from shakespeare.run.composition import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent


def find_real_corpus() -> Path | None:
    """tinyshakespeare where a user or CI keeps it: $SHAKESPEARE_CORPUS, ../shared/data/ beside the checkout
    (CI's layout), or the download cache a first `python train.py` fills; None when it is nowhere."""
    cache = Path(os.environ.get("SHAKESPEARE_CACHE", "~/.cache/shakespeare")).expanduser()
    places = [os.environ.get("SHAKESPEARE_CORPUS"), ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
              cache / "tinyshakespeare.txt"]
    return next((Path(p) for p in places if p and Path(p).is_file()), None)


REAL_CORPUS = find_real_corpus()
WITHOUT_CORPUS = ("the real corpus is not here: set SHAKESPEARE_CORPUS=/path/to/tinyshakespeare.txt, or put it at "
                  "../shared/data/tinyshakespeare.txt beside the checkout, or run `python train.py` once to download it")
WORDS = "the king my lord good sweet love thou art what shall now come hath night death fair".split()


def write_corpus(path: Path, n_chars: int = 20_000, seed: int = 0) -> Path:
    """A deterministic play-like text, so tests never need the real corpus."""
    rng, lines = random.Random(seed), []
    while sum(map(len, lines)) < n_chars:
        speaker = rng.choice(["ROMEO", "JULIET", "KING HENRY", "NURSE"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".\n\n")
    path.write_text("".join(lines)[:n_chars], encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def cache_in_a_temporary_folder(tmp_path_factory):
    """Downloads and token caches made by the tests go to a temporary folder, not ~/.cache/shakespeare."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHAKESPEARE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def compose_train(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose conf/train.yaml as `python train.py ...overrides` would, writing under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


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
