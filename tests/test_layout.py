"""The house: data flows one way through the package's rooms, private hooks of other projects live in one
module and are all still where the code expects them, and checkpoints written before the rooms moved still
load, resume and generate."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from shakespeare import internals
from shakespeare.cli.train import fit
from shakespeare.model.loading import load_generator
from shakespeare.model.sampling import sample
from tests.harness import ROOT, compose_train, write_corpus

# config -> data (tokenizer) -> module (model) -> trainer -> run folder -> report / generate / evaluate
FLOORS = {
    "errors": 0,
    "ranges": 1,
    "tokenizer": 1,
    "budget": 1,  # the fraction of a run's budget spent: the data's context schedule and the module's scheduler
    "internals": 1,
    "model": 2,
    "data": 2,
    "training": 3,
    "evaluation": 3,  # scoring and compression by a checkpoint's model: never training or runs
    "run": 4,
    "cli": 5,
    "report": 5,
}
PRIVATE = re.compile(
    r"\._signal_connector|\._accelerator_connector|_ChildProcessObserver|_set_pg_timeout|"
    r"_SubprocessScriptLauncher|optim\._muon|_zeropower_via_newtonschulz"
)


def rooms() -> list[tuple[str, Path]]:
    return [
        (path.relative_to(ROOT / "shakespeare").parts[0].removesuffix(".py"), path)
        for path in sorted((ROOT / "shakespeare").rglob("*.py"))
        if path.name != "__init__.py"
    ]


@pytest.mark.parametrize("room, path", rooms(), ids=lambda value: str(value).rsplit("shakespeare/", 1)[-1])
def test_imports_run_down_the_floors_never_back_up(room, path):
    assert room in FLOORS, f"{path} is in a room the layout does not name: add it to FLOORS and the README"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shakespeare."):
            target = node.module.split(".")[1]
            assert FLOORS[target] < FLOORS[room] or target == room, f"{path} imports {node.module}, a floor up"


def test_only_internals_touches_the_private_parts_of_other_projects():
    for _, path in rooms():
        if path.name != "internals.py":
            assert not PRIVATE.search(path.read_text(encoding="utf-8")), f"{path} reaches into a private hook"


@pytest.mark.parametrize("hook", sorted(internals.HOOKS))
def test_every_private_hook_is_still_where_the_code_expects_it(hook):
    if hook.startswith("hydra:") and importlib.util.find_spec(hook.rsplit(" ", 1)[-1]) is None:
        pytest.skip(f"{hook.rsplit(' ', 1)[-1]} is not installed (the scale extra)")
    assert internals.HOOKS[hook](), f"{hook} moved in this version: update shakespeare/internals.py"


# the checkpoint in tests/fixtures was written by the flat layout (shakespeare/muon.py and its peers), with these
FIXTURE = ROOT / "tests" / "fixtures" / "qk_norm_muon_before_the_move.ckpt"
TRAINED_WITH = [
    "model=qk_norm",
    "model.embedding_size=16",
    "model.num_heads=2",
    "model.num_blocks=1",
    "data.sequence_length=16",
    "optimizer=muon",
    "scheduler=warmup_cosine",
    "scheduler.warmup_steps=2",
    "data.batch_size=32",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "callbacks.research_log.sample_length=0",
    "callbacks.generation_sample.max_new_tokens=0",
]


@pytest.mark.slow  # trains runs (or reads a trained one) end to end
def test_a_checkpoint_written_before_the_rooms_moved_still_loads_resumes_and_generates(tmp_path):
    model, tokenizer = load_generator(FIXTURE)
    text = sample(model, tokenizer, "ROMEO:", max_new_tokens=40, generator=torch.Generator().manual_seed(0))[0]
    assert len(text) == 40 and model.cfg.qk_norm and model.cfg.num_blocks == 1
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURE, run / "checkpoints" / "last.ckpt")
    corpus = write_corpus(tmp_path / "corpus.txt")  # the corpus it was trained on
    fit(compose_train(run, [*TRAINED_WITH, f"data.path={corpus}", "trainer.max_epochs=2", f"ckpt_path={run}"]))
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10 and resumed["hyper_parameters"]["optimizer"]["_target_"].endswith(
        "training.muon.MuonAdamW"
    )
