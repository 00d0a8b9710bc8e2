"""Nothing lost: SIGTERM, Ctrl-C and kill -9 mid-run, exact resumption, NaN losses, failing sweep jobs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shakespeare.cli.train import fit
from shakespeare.data.windows import SlidingWindows
from shakespeare.errors import Interrupted, UsageError
from shakespeare.report.runs import load_runs
from shakespeare.run.checkpoints import AtomicCheckpointIO
from tests.harness import (
    ROOT,
    assert_same_run,
    compose_train,
    start_train,
    wait_for,
    write_corpus,
)

# 3 epochs of 6 steps with dropout (so the random state matters), last.ckpt every 4 steps
RUN = [
    "model=block_norm_dropout",
    "data.batch_size=32",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_steps=4",
]


@pytest.fixture(scope="module")
def corpus_and_reference(tmp_path_factory) -> tuple[Path, Path]:
    """A corpus and the checkpoints folder of the uninterrupted run on it."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(tmp / "corpus.txt")
    fit(compose_train(tmp / "run", [f"data.path={corpus}", *RUN]))
    return corpus, tmp / "run" / "checkpoints"


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p.parent.parent for p in (cwd / "outputs").glob("*/*/checkpoints/last.ckpt"))


def assert_interrupted(out: str, run: Path, sig: signal.Signals, step: int, epoch: int, corpus: Path) -> None:
    """The checkpoint holds the step; the message and the research log say so and how to resume."""
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    assert (
        f"Training interrupted by {sig.name}. Saved {run / 'checkpoints' / 'last.ckpt'} at step {step} (epoch {epoch})."
        in out
    )
    assert f"Resume with: python train.py data.path={corpus} " in out and f"ckpt_path={run}" in out
    assert "Traceback" not in out
    assert f"Status: interrupted (Training interrupted by {sig.name}." in (run / "research_log.md").read_text()


def interrupt_at(step: int, sig: signal.Signals, args: list[str], tmp_path):
    """Start a run, send `sig` once it pauses at `step`, and return its output and its run folder."""
    proc = start_train(
        [*args, "+callbacks.pause._target_=tests.probes.PauseAt", f"+callbacks.pause.step={step}"], tmp_path
    )
    wait_for(proc, f"paused at step {step}")
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + sig, out[-3000:]
    [run] = run_folders(tmp_path)
    return out, run


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(tmp_path, corpus):
    out, run = interrupt_at(7, signal.SIGINT, [f"data.path={corpus}", *RUN], tmp_path)
    assert run_folders(tmp_path) == [run]
    assert out.count("Ctrl-C: saving a checkpoint") == 1 and "SIGTERM" not in out  # one interruption, one message
    assert_interrupted(out, run, signal.SIGINT, step=7, epoch=1, corpus=corpus)


@pytest.mark.slow
def test_sigterm_then_ckpt_path_last_continues_the_same_run_exactly(tmp_path, corpus_and_reference):
    corpus, reference = corpus_and_reference
    args = [f"data.path={corpus}", *RUN]
    out, run = interrupt_at(9, signal.SIGTERM, args, tmp_path)
    assert_interrupted(out, run, signal.SIGTERM, step=9, epoch=1, corpus=corpus)
    original = (run / ".hydra" / "overrides.yaml").read_text()
    time.sleep(2.5)  # a gap between the sessions that no epoch's time may count

    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "ckpt_path=last"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert run_folders(tmp_path) == [run]  # no new run folder: the same one continues
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # one TensorBoard run, one events file per session
    assert (run / ".hydra" / "overrides.yaml").read_text() == original and list(
        run.glob(".hydra/resumed-*/config.yaml")
    )
    assert "Status: finished" in (run / "research_log.md").read_text()
    assert_same_run(run / "checkpoints", reference)
    lines, uninterrupted = epoch_lines(run / "research_log.md"), epoch_lines(reference.parent / "research_log.md")
    assert [(epoch, train) for epoch, _, train in lines] == [(epoch, train) for epoch, _, train in uninterrupted]
    assert lines[1][1] < 2.0  # the interrupted epoch: its steps before and after the interruption, not the gap
    assert load_runs(run)[0].seconds_per_epoch < 2.0  # and the report's time per epoch


def epoch_lines(research_log: Path) -> list[tuple[str, float, str]]:
    """(epoch, seconds, train loss) of each epoch line in a research log."""
    found = re.findall(r"^(\d+/\d+) -- ([\d.]+)s \tTrain loss \t([\d.]+)", research_log.read_text(), re.M)
    return [(epoch, float(seconds), train) for epoch, seconds, train in found]


@pytest.mark.slow
def test_kill_9_loses_at_most_every_n_steps_and_the_run_folder_resumes_exactly(tmp_path, corpus_and_reference):
    corpus, reference = corpus_and_reference
    args = [f"data.path={corpus}", *RUN]
    proc = start_train([*args, "+callbacks.pause._target_=tests.probes.PauseAt", "+callbacks.pause.step=11"], tmp_path)
    wait_for(proc, "paused at step 11")
    proc.kill()
    proc.communicate(timeout=60)
    [run] = run_folders(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8  # 11 - 8 < 4 lost

    fit(compose_train(run, [*args, f"ckpt_path={run}"]))
    assert_same_run(run / "checkpoints", reference)


@pytest.mark.slow
def test_sigterm_during_validation_resumes_with_the_next_epoch(tmp_path, corpus_and_reference):
    # SIGTERM after an epoch's last step stops the validation that follows: the next epoch must start afresh
    corpus, reference = corpus_and_reference
    args = [f"data.path={corpus}", *RUN]
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="Saved .* at step 6 "):
        fit(compose_train(run, [*args, "+callbacks.stop._target_=tests.probes.SignalAt", "+callbacks.stop.step=6"]))
    fit(compose_train(run, [*args, f"ckpt_path={run}"]))
    assert_same_run(run / "checkpoints", reference)


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tiny_cfg):
    cfg = tiny_cfg(
        "trainer.max_epochs=2",
        "checkpoint.every_n_steps=2",
        "+callbacks.poison._target_=tests.probes.PoisonAt",
        "+callbacks.poison.step=8",
    )
    with pytest.raises(
        UsageError, match=r"The training loss became nan at step 8 \(epoch 1\).*optimizer.lr=0.0001 \(it was 0.001\)"
    ):
        fit(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def crash(obj, f):  # the process dies halfway through writing the next checkpoint
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}


def test_windows_resume_only_within_their_epoch():
    windows = SlidingWindows(torch.arange(100), torch.arange(90), sequence_length=4, batch_size=10, shuffle=True)
    windows.set_epoch(0)
    first = [x[0, 0].item() for x, _ in windows]
    windows.load_state_dict({"epoch": 0, "position": 3})
    windows.set_epoch(0)  # Lightning resumes epoch 0: the remaining batches
    assert [x[0, 0].item() for x, _ in windows] == first[3:]
    windows.load_state_dict({"epoch": 0, "position": 3})
    windows.set_epoch(1)  # epoch 0 had ended (e.g. limit_train_batches): epoch 1 from its start
    assert len(list(windows)) == 9 and windows.epoch == 1


@pytest.mark.slow
def test_a_failing_sweep_job_is_reported_and_the_others_keep_their_results(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = [
        "-m",
        "model=multihead",
        "model.num_heads=3,4",
        f"data.path={corpus}",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    jobs = sorted(p for p in (tmp_path / "outputs" / "multiruns").glob("*/*/*") if p.is_dir())
    assert [(p / "checkpoints" / "last.ckpt").exists() for p in jobs] == [False, True]  # the failure came first
    assert "1 of 2 sweep jobs failed (the others finished and kept their results):" in out
    assert f"{jobs[0].name}: model.num_heads=3 does not divide model.embedding_size=32" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_step_budget_with_scheduler_and_mid_epoch_validation_resumes_exactly(tmp_path, corpus):
    # SIGTERM at step 8 lands in the validation that runs every 4 steps; the warm-up/cosine schedule goes on
    args = [
        f"data.path={corpus}",
        *RUN,
        "trainer.max_epochs=-1",
        "trainer.max_steps=20",
        "trainer.val_check_interval=4",
        "scheduler=warmup_cosine",
        "scheduler.warmup_steps=5",
    ]
    fit(compose_train(tmp_path / "reference", args))
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="Saved .* at step 8 "):
        fit(compose_train(run, [*args, "+callbacks.stop._target_=tests.probes.SignalAt", "+callbacks.stop.step=8"]))
    fit(compose_train(run, [*args, f"ckpt_path={run}"]))
    got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    want = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 20
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=0, atol=1e-6)
