"""The train command: every rung trains, the run folder fills, early stopping and the accelerator error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from shakespeare.cli.train import fit
from shakespeare.errors import UsageError
from shakespeare.run.checks import check_accelerator
from shakespeare.run.composition import CONFIG_DIR
from tests.harness import (
    ROOT,
    RUNGS,
    compose_train,
    run_train,
    write_corpus,
)


@pytest.mark.slow
@pytest.mark.parametrize("rung", RUNGS)
def test_every_rung_trains_and_fills_its_run_folder(rung, tiny_cfg, capsys):
    cfg = tiny_cfg(f"model={rung}")
    metrics = fit(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    run = Path(cfg.paths.output_dir)
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list(run.glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "0/1 -- " in out and "Train loss" in out and "Eval loss" in out and "<<" in out
    assert "Training completed. Elapsed time: " in out


@pytest.mark.slow
def test_training_lowers_the_loss(tiny_cfg):
    before = fit(tiny_cfg("model=head", "trainer.max_epochs=1", "trainer.limit_train_batches=1"))["val/loss"]
    after = fit(tiny_cfg("model=head", "trainer.max_epochs=3", "trainer.limit_train_batches=40", "optimizer.lr=0.01"))
    assert after["val/loss"] < before - 0.3


@pytest.mark.slow  # trains
def test_early_stopping_stops(tiny_cfg, capsys):
    # the best loss is epoch 1's; epochs 2 and 3 improve on it by less than min_delta, so patience 2 stops there
    losses = "+callbacks.script.losses=[3.0,2.5,2.45,2.6,2.0]"
    fit(
        tiny_cfg(
            "model=bigram",
            "trainer.max_epochs=10",
            "callbacks.early_stopping.patience=2",
            "callbacks.early_stopping.min_delta=0.1",
            "+callbacks.script._target_=tests.probes.ScriptedValLoss",
            losses,
        )
    )
    out = capsys.readouterr().out
    assert "3/10 -- " in out and "4/10 -- " not in out


def test_min_delta_without_patience_is_refused(tiny_cfg):
    with pytest.raises(UsageError, match="min_delta=0.01 is set but patience is null"):
        fit(tiny_cfg("callbacks.early_stopping.min_delta=0.01"))


def test_missing_accelerator_names_the_available_ones():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    with pytest.raises(
        UsageError, match=r"trainer.accelerator=mps is not available on this machine; available here: cpu"
    ):
        check_accelerator("mps")
    with pytest.raises(UsageError, match="choose one of"):
        check_accelerator("tpuu")
    for name in ("cpu", "auto"):
        check_accelerator(name)


@pytest.mark.slow
def test_cli_accelerator_error_is_one_paragraph(tmp_path):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = run_train([f"data.path={corpus}", "model=block_norm_dropout", "trainer.accelerator=mps"], tmp_path)
    assert result.returncode == 2
    assert "trainer.accelerator=mps is not available" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_users_sweep_trains_one_model_per_job_whose_folder_pastes_back_unquoted(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    tiny = [f"data.path={corpus}", "data.batch_size=32", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
    result = run_train(["-m", "model.num_heads=4,8", *tiny, "trainer.max_epochs=1"], tmp_path)  # the default rung
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "outputs" / "multiruns").glob("*/*/*/checkpoints"))
    # data.path stays out of the names (a path, not a label); a capped run says so
    capped = "trainer.limit_train_batches-3+trainer.limit_val_batches-2"
    assert [p.name for p in jobs] == [
        f"{i}_data.batch_size-32+model.num_heads-{h}+{capped}+trainer.max_epochs-1" for i, h in ((0, 4), (1, 8))
    ]
    for job, heads in zip(jobs, (4, 8)):
        assert list(job.glob("events.out.tfevents.*")) and (job / "checkpoints" / "last.ckpt").exists()
        model = (job / "research_log.md").read_text().split("optimizer=")[0]
        assert f"(0-{heads - 1}): {heads} x AttentionHead(" in model

    job = jobs[0].relative_to(tmp_path)  # pasted as printed, unquoted, into both commands
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    resumed = subprocess.run(
        f"{sys.executable} {ROOT / 'train.py'} model.num_heads=4 {' '.join(tiny)} trainer.max_epochs=2 ckpt_path={job}",
        shell=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1/2 -- " in (jobs[0] / "research_log.md").read_text()  # the job's own folder went on
    generated = subprocess.run(
        f"{sys.executable} {ROOT / 'generate.py'} ckpt_path={job} max_new_tokens=20",
        shell=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0 and len(generated.stdout) == 21, generated.stderr[-3000:]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.num_heads=4,8"],
        ["model=multihead", "model.num_heads=8", "trainer.max_epochs=20", "data.split=random_windows"],
        ["optimizer=adamw", "optimizer.lr=3e-4", "trainer.precision=bf16-mixed", "scheduler=warmup_cosine"],
    ],
)
@pytest.mark.slow
def test_a_sweep_job_folder_pastes_unquoted_into_ckpt_path(overrides, tmp_path):
    """The folder name a -m sweep gives a job parses back as a plain value for train.py and generate.py."""
    job = compose_train(tmp_path, [o.split(",")[0] for o in overrides])  # the first job of the sweep
    folder = f"outputs/multiruns/2026-01-01/12-00-00-000000/{OmegaConf.select(job, 'hydra.sweep.subdir')}"
    assert folder.endswith("0_" + job.hydra.job.override_dirname) and job.hydra.job.override_dirname
    assert compose_train(tmp_path, [f"ckpt_path={folder}"]).ckpt_path == folder
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        assert compose("generate", overrides=[f"ckpt_path={folder}"]).ckpt_path == folder


@pytest.mark.slow  # trains
def test_on_a_terminal_the_bar_is_drawn_and_the_end_of_training_sample_still_printed(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # capsys's stdout, as a terminal would be
    fit(
        tiny_cfg(
            "model=bigram",
            "trainer.enable_progress_bar=true",
            "callbacks.progress_bar.refresh_rate=1",
            "callbacks.generation_sample.max_new_tokens=30",
        )
    )
    out = capsys.readouterr().out
    assert "Epoch 0: 100%" in out and "it/s" in out  # Lightning's bar
    assert "Generation:\n---------- Predict from empty input:\n" in out  # printed after the bar was closed


@pytest.mark.slow  # trains
def test_piped_the_bar_is_off(tiny_cfg, capsys):
    fit(tiny_cfg("model=bigram", "trainer.enable_progress_bar=true", "callbacks.progress_bar.refresh_rate=1"))
    out = capsys.readouterr().out
    assert "it/s" not in out and "\r" not in out and "0/1 -- " in out and "Generation:" in out


NOISE = (
    "Seed set to",
    "GPU available:",
    "TPU available:",
    "`Trainer.fit` stopped",
    "litlogger",
    "litmodels",
    "smaller than the logging interval",
)


@pytest.mark.slow
def test_a_run_piped_to_a_file_prints_epoch_lines_and_no_noise(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = [
        f"data.path={corpus}",
        "model=block_norm_dropout",
        "data.batch_size=32",
        "trainer.limit_train_batches=40",
        "trainer.limit_val_batches=2",
        "callbacks.progress_bar.refresh_rate=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for epochs, resume in ((1, []), (2, ["ckpt_path=last"])):
        log = tmp_path / f"log{epochs}.txt"
        with open(log, "w") as out:  # stdout is a file, as under CI, SLURM or `| tee`
            code = subprocess.run(
                [sys.executable, str(ROOT / "train.py"), *args, f"trainer.max_epochs={epochs}", *resume],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
            ).returncode
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert f"{epochs - 1}/{epochs} -- " in text and "Training completed" in text and "Generation:" in text
        assert "\r" not in text and "it/s" not in text and len(text.splitlines()) < 60  # nothing per batch
        assert not [noise for noise in (*NOISE, "LeafSpec", "exists and is not empty") if noise in text], text
        *_, where, write, report, board = text.rstrip("\n").split("\n")  # it ends saying where it is
        folder = where.removeprefix("Run folder: ")
        assert where.startswith("Run folder: outputs/") and (tmp_path / folder / "checkpoints" / "best.ckpt").is_file()
        assert (write, report, board) == (
            f"  python generate.py ckpt_path={folder}",
            f"  python -m shakespeare.report {folder}",
            f"  tensorboard --logdir {folder}",
        )


def test_a_refused_run_says_nothing_but_why(tiny_cfg, caplog):
    with pytest.raises(UsageError):
        fit(tiny_cfg("data.batch_size=0"))
    assert "Seed set" not in caplog.text


@pytest.mark.slow
def test_on_a_terminal_the_bar_is_gone_before_the_last_lines(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    corpus = write_corpus(tmp_path / "corpus.txt")
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows of 160: room for the bar
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        f"data.path={corpus}",
        "model=block",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=60",
        "callbacks.progress_bar.refresh_rate=1",
        "data.batch_size=64",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: the run ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "it/s" in shown  # the bar was drawn on the terminal
    before, after = shown.split("Training completed", 1)
    assert "it/s" not in after and "Epoch" not in after  # not redrawn after the run's last lines
    assert before.rsplit("\n", 1)[-1].strip("\r \x1b[A2K") == ""  # the line starts on a line of its own
