"""Every folder the project writes pastes back into its commands, whatever the override values: times, lists,
negative numbers, quoted strings, paths."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from shakespeare.cli.generate import write_samples
from shakespeare.cli.train import fit
from shakespeare.report.runs import load_runs
from shakespeare.report.tables import markdown_table
from shakespeare.run.composition import CONFIG_DIR
from shakespeare.run.folders import folder_name, unescaped
from tests.harness import ROOT, compose_train, run_train

# one sweep, four jobs: a time as Hydra escapes it, a time as a mapping, a quoted name with a space, a list,
# a negative number (and data.path, a path, which names no folder)
SWEEP = [
    "model=bigram",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.max_steps=-1",
    "optimizer=adamw",
    "optimizer.betas=[0.8,0.9]",
    "trainer.max_time=00:00:01:00,{minutes:2}",
    "model.name='my rung',plain",
]


def pasted(folder: Path) -> str:
    """`folder` pasted unquoted after ckpt_path= on a shell's command line, as Hydra then reads it."""
    (word,) = shlex.split(f"ckpt_path={folder}")  # one word: nothing the shell splits, expands or unquotes
    return OverridesParser.create().parse_override(word).value()


@pytest.mark.parametrize(
    "text, name",
    [
        (r"trainer.max_time-00\:00\:00\:15", "trainer.max_time-00_00_00_15"),
        ("optimizer.betas-[0.9,0.95]", "optimizer.betas-0.9_0.95"),
        ("model.name-'my rung'+seed--3", "model.name-my_rung+seed--3"),
        (
            r"trainer.max_time-{minutes\:10}+data.path-/tmp/a b.txt",
            "trainer.max_time-minutes_10+data.path-_tmp_a_b.txt",
        ),
    ],
)
def test_folder_names_keep_only_what_pastes_back(text, name, tmp_path):
    assert folder_name(text) == name
    assert pasted(tmp_path / name) == str(tmp_path / name)


def test_long_names_are_cut_and_stay_apart():
    one, two = folder_name("x" * 300 + "1"), folder_name("x" * 300 + "2")
    assert len(one) <= 200 and len(two) <= 200 and one != two


def test_overrides_are_shown_as_typed():
    assert unescaped(r"trainer.max_time=00\:00\:00\:15") == "trainer.max_time=00:00:00:15"
    assert unescaped(r"model.name=a\,b") == r"model.name=a\,b"  # without its escape, the comma would make it a sweep
    assert unescaped("optimizer.betas=[0.8,0.9]") == "optimizer.betas=[0.8,0.9]"


@pytest.mark.slow
def test_every_sweep_folder_pastes_back_into_train_and_generate(tmp_path, corpus):
    result = run_train(["-m", f"data.path={corpus}", *SWEEP], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\\" not in result.stdout + result.stderr  # the sweep log lists the overrides as typed
    jobs = sorted(p for p in (tmp_path / "outputs" / "multiruns").glob("*/*/*") if p.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        assert (
            "\\" not in job.name and "limit_train_batches-3" in job.name
        )  # TensorBoard's run names; a capped run says so
        assert pasted(job) == str(job)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("generate", overrides=shlex.split(f"ckpt_path={job} max_new_tokens=5"))
        assert len(write_samples(cfg, out=open("/dev/null", "w"))[0]) == 5
        typed = (job / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")
        overrides = [unescaped(line[2:]) for line in typed.splitlines() if line.startswith("- ")]
        resumed = compose_train(job, [*shlex.split(f"ckpt_path={job}"), *overrides, "trainer.max_epochs=2"])
        assert fit(resumed)["val/loss"] > 0
    table = markdown_table(load_runs(jobs[0].parent))
    assert "\\:" not in table and "`trainer.max_time=00:00:01:00`" in table
    generated = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), f"ckpt_path={jobs[0]}", "max_new_tokens=5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
