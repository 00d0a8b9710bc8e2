"""What the tests share: a synthetic corpus, configs composed as the commands compose them, the commands run as
subprocesses, and a real TensorBoard server to read runs back through."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import shakespeare.cli.train  # noqa: F401  (registers the resolvers train.py's config uses, as train.py does)
from shakespeare.cli.train import fit
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.run.composition import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent


def find_real_corpus() -> Path | None:
    """tinyshakespeare where a user or CI keeps it: $SHAKESPEARE_CORPUS, ../shared/data/ beside the checkout
    (CI's layout), or the download cache a first `python train.py` fills; None when it is nowhere."""
    cache = Path(os.environ.get("SHAKESPEARE_CACHE", "~/.cache/shakespeare")).expanduser()
    places = [
        os.environ.get("SHAKESPEARE_CORPUS"),
        ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
        cache / "tinyshakespeare.txt",
    ]
    return next((Path(p) for p in places if p and Path(p).is_file()), None)


REAL_CORPUS = find_real_corpus()

WITHOUT_CORPUS = (
    "the real corpus is not here: set SHAKESPEARE_CORPUS=/path/to/tinyshakespeare.txt, or put it at "
    "../shared/data/tinyshakespeare.txt beside the checkout, or run `python train.py` once to download it"
)

WORDS = "the king my lord good sweet love thou art what shall now come hath night death fair".split()


def write_corpus(path: Path, n_chars: int = 20_000, seed: int = 0) -> Path:
    """A deterministic play-like text, so tests never need the real corpus."""
    rng, lines = random.Random(seed), []
    while sum(map(len, lines)) < n_chars:
        speaker = rng.choice(["ROMEO", "JULIET", "KING HENRY", "NURSE"])
        lines.append(
            f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".\n\n"
        )
    path.write_text("".join(lines)[:n_chars], encoding="utf-8")
    return path


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


RUNGS = ["bigram", "head", "multihead", "multihead_ffn", "block", "block_norm", "block_norm_dropout"]


def run_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def compose_generate(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("generate", overrides=list(overrides))


def start_train(args: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """Start `python train.py *args`; with `new_session`, in a process group of its own, as a terminal's
    foreground job is (Ctrl-C reaches the whole group)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def wait_for(proc: subprocess.Popen, marker: str) -> str:
    """Read the run's output up to the line containing `marker` (the run pauses there)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.wait()
    raise AssertionError(f"the run ended (rc {proc.returncode}) before printing {marker!r}:\n{''.join(seen)[-3000:]}")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def final_val_loss(checkpoint: Path) -> float:
    """The last epoch's val/loss: best.ckpt's score (the loss falls every epoch in these short runs)."""
    states = torch.load(checkpoint, weights_only=True)["callbacks"]
    return float(next(s["best_model_score"] for key, s in states.items() if "'monitor': 'val/loss'" in key))


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same epochs, same final weights, same final validation loss (1e-4) as the uninterrupted run."""
    got, want = (
        torch.load(resumed / "last.ckpt", weights_only=True),
        torch.load(reference / "last.ckpt", weights_only=True),
    )
    assert (got["epoch"], got["global_step"]) == (want["epoch"], want["global_step"])
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=0, atol=1e-6)
    assert abs(final_val_loss(resumed / "best.ckpt") - final_val_loss(reference / "best.ckpt")) < 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard(logdir: Path, ready_tag: str = "val/loss"):
    """A real TensorBoard server over `logdir`; yields `get(path, body=None, raw=False)`, which reads
    `/data/plugin/<path>` (JSON, or bytes with raw=True), once a run's scalar `ready_tag` is loaded."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"

    def get(path: str, body: dict | None = None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "X-XSRF-Protected": "1"} if body is not None else {}
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers), timeout=10) as r:
            return r.read() if raw else json.loads(r.read())

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if any(ready_tag in tags for tags in get("/scalars/tags").values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield get
    finally:
        server.terminate()
        server.wait(timeout=10)


def fast_first(cases: list, keep: int = 1) -> list:
    """Parametrize cases: the first `keep` run in the fast suite, the rest in the full one only (marked slow), so the
    fast suite checks the behaviour once and CI on every case. A case is its arguments (a tuple, or one value)."""
    slow = [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow) for c in cases[keep:]]
    return [*cases[:keep], *slow]


ROTARY_RUNGS = [
    ("rope", []),
    ("qk_norm", []),
    ("qk_norm", ["model.norm=layer", "model.num_blocks=3", "model.feed_forward_size=64"]),  # cpu_speedrun's parts
    ("qk_norm", ["model.ngrams=3"]),  # the ngram rung's embeddings: 2-grams in a row each, 3-grams hashed
]


def rotary_model(rung: str, overrides: list[str], tmp_path, sequence_length: int = 8) -> ShakespeareGenerator:
    cfg = compose_train(tmp_path, [f"model={rung}", f"data.sequence_length={sequence_length}", *overrides])
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=66, **OmegaConf.to_container(cfg.model, resolve=True)))
    for table in model.ngrams.tables if model.ngrams is not None else []:
        torch.nn.init.normal_(table.weight)  # as if trained: they start at zero
    return model.eval()


def train_like_hydra(run: Path, overrides: list[str]) -> None:
    """Train in-process and leave the `.hydra/` record a `python train.py` run leaves; exceptions propagate."""
    cfg = compose_train(run, overrides)
    record = run / ".hydra"
    record.mkdir(parents=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra)}), record / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), record / "overrides.yaml")
    fit(cfg)
