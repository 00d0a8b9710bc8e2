"""The report over a folder of runs (a sweep with a crashed run in it, an empty folder), the ladder, the notebook."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from shakespeare.report.__main__ import main
from shakespeare.report.figures import labels, validation_curves, write_figures
from shakespeare.report.runs import Run, load_runs
from shakespeare.report.samples import samples_section
from shakespeare.run.composition import CONFIG_DIR
from shakespeare.training.tags import ELAPSED
from tests.harness import ROOT, RUNGS, compose_train, train_like_hydra, write_corpus

TINY = [
    "data.batch_size=32",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A sweep of two finished runs (one without research_log.md) and one that crashed in epoch 1 of 3,
    plus a run that died before its first epoch and one whose event file is garbage."""
    root = tmp_path_factory.mktemp("outputs")
    corpus = write_corpus(root.parent / "corpus.txt")
    sweep = root / "multiruns" / "2026-01-01" / "12-00-00"
    for i, rung in enumerate(["bigram", "head"]):
        train_like_hydra(
            sweep / f"{i}_model-{rung}", [f"model={rung}", f"data.path={corpus}", "trainer.max_epochs=2", *TINY]
        )
    (sweep / "1_model-head" / "research_log.md").unlink()  # the report must not need it
    crash = ["+callbacks.fail._target_=tests.test_research_log.FailAtEpoch", "+callbacks.fail.epoch=1"]
    with pytest.raises(RuntimeError):
        train_like_hydra(
            sweep / "2_model-multihead",
            ["model=multihead", f"data.path={corpus}", "trainer.max_epochs=3", *TINY, *crash],
        )
    (root / "died" / ".hydra").mkdir(parents=True)
    shutil.copy(sweep / "0_model-bigram" / ".hydra" / "config.yaml", root / "died" / ".hydra" / "config.yaml")
    (root / "garbled").mkdir()
    (root / "garbled" / "events.out.tfevents.123.host.1.0").write_bytes(b"\x00\xff not an event file" * 10)
    GlobalHydra.instance().clear()
    return root


@pytest.mark.slow
def test_report_lists_every_run_with_its_figures_and_status(runs, tmp_path, capsys):
    assert main([str(runs), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "report.md").read_text()
    assert printed.split("\n\nWrote")[0].strip() in table
    rows = {
        row.split(" | ")[-1].rstrip(" |"): row
        for row in table.splitlines()
        if row.startswith("| ") and "---" not in row
    }
    bigram, head = (
        rows["multiruns/2026-01-01/12-00-00/0_model-bigram"],
        rows["multiruns/2026-01-01/12-00-00/1_model-head"],
    )
    crashed = rows["multiruns/2026-01-01/12-00-00/2_model-multihead"]
    # rung | overrides | parameters | trained | best eval loss | log's eval loss | eval bpc | s/epoch | tokens/s | status | run
    assert "test loss" not in table  # no run has a test split
    cells = bigram.strip("| ").split(" | ")
    capped = "`trainer.max_epochs=2` `data.batch_size=32` `trainer.limit_train_batches=5` `trainer.limit_val_batches=2`"
    assert cells[:4] == ["bigram", capped, "2,025", "2/2"]  # 45 x 45 logits; a capped run says so
    assert re.fullmatch(r"\d\.\d{4}", cells[4]) and cells[5] == "-" and cells[9] == "finished"  # not the log's settings
    assert float(cells[6]) == pytest.approx(float(cells[4]) / math.log(2), abs=2e-4)  # bits per character
    assert re.fullmatch(r"\d+\.\d\d", cells[7]) and re.fullmatch(r"[\d,]+", cells[8])  # measured tokens/s
    cells = head.strip("| ").split(" | ")
    assert cells[0] == "head" and cells[9] == "finished"  # from events alone
    cells = crashed.strip("| ").split(" | ")
    assert cells[3] == "1/3" and cells[9] == "failed (RuntimeError: disk on fire)"
    assert rows["died"].strip("| ").split(" | ")[9] == "failed (no epoch finished)"
    assert "garbled" in rows
    assert (tmp_path / "val_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [run.rung for run in load_runs(runs)][:3] == ["bigram", "bigram", "head"]  # ladder order


def samples_by_run(report: str) -> dict[str, str]:
    """The samples section of report.md: run folder -> its sample (or what the report says instead)."""
    section = report.split("\n## Samples\n", 1)[1]
    parts = re.split(r"^### .+ \((.+)\)\n\n", section, flags=re.M)[1:]
    return {
        name: re.sub(r"^```text\n(.*)\n```$", r"\1", body.strip("\n"), flags=re.S)
        for name, body in zip(parts[::2], parts[1::2])
    }


@pytest.mark.slow  # trains runs (or reads a trained one) end to end
def test_report_shows_each_runs_sample_from_the_same_prompt_and_seed(runs, tmp_path, capsys):
    sweep = "multiruns/2026-01-01/12-00-00/"
    assert main([str(runs), "--out", str(tmp_path), "--prompt", "KING", "--seed", "3", "--sample-length", "60"]) == 0
    samples = samples_by_run((tmp_path / "report.md").read_text())
    ordered = load_runs(runs)
    assert list(samples) == [run.name for run in ordered]  # every run, rung by rung as in the table
    written = [samples[sweep + name] for name in ("0_model-bigram", "1_model-head", "2_model-multihead")]
    assert all(text.startswith("KING") and len(text) == 4 + 60 for text in written)
    assert len(set(written)) == 3  # each rung writes its own
    assert samples["died"] == "No checkpoint to sample from."
    assert samples_by_run("\n" + samples_section(ordered, "KING", 3, 60)) == samples  # same prompt and seed, same text
    assert samples_by_run("\n" + samples_section(ordered[2:3], "KING", 4, 60))[sweep + "1_model-head"] != written[1]
    assert main([str(runs), "--sample-length", "-1"]) == 2 and "--sample-length=-1" in capsys.readouterr().err


def test_report_plots_the_loss_by_position_and_exports_the_readmes_figures(runs, tmp_path):
    ordered = load_runs(runs)
    by_name = {run.name: run for run in ordered}
    finished = [by_name[f"multiruns/2026-01-01/12-00-00/{i}_model-{rung}"] for i, rung in enumerate(["bigram", "head"])]
    for run in finished:  # each position's loss at the best epoch; together they average to the best eval loss
        assert len(run.loss_by_position) == 8 and sum(run.loss_by_position) / 8 == pytest.approx(
            run.best_val_loss, rel=1e-5
        )
    assert write_figures(ordered, tmp_path) == [tmp_path / "loss_by_position.png", tmp_path / "attention.png"]
    assert (tmp_path / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"
    crashed = by_name["multiruns/2026-01-01/12-00-00/2_model-multihead"]  # the highest rung with a grid
    assert (tmp_path / "attention.png").read_bytes() == crashed.attention_grid()
    assert by_name["multiruns/2026-01-01/12-00-00/0_model-bigram"].attention_grid() is None  # nothing to attend with


def test_a_run_without_its_log_that_stopped_short_is_partial(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs / "multiruns" / "2026-01-01" / "12-00-00" / "2_model-multihead", copy)
    (copy / "research_log.md").unlink()
    [run] = load_runs(copy)
    assert run.status == "stopped early or partial (1/3 epochs)" and run.epochs == 1


def test_report_on_a_folder_without_runs_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "No runs under" in err and "python train.py -m experiment=ladder" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_ladder_experiment_sweeps_every_rung_at_the_logs_settings():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ladder"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.model.split(",") == RUNGS
    assert (cfg.data.batch_size, cfg.data.sequence_length, cfg.trainer.max_epochs, cfg.optimizer.lr) == (
        1024,
        8,
        10,
        0.001,
    )
    assert cfg.optimizer._target_ == "torch.optim.Adam"


@pytest.mark.slow
def test_ablation_notebook_runs_on_a_folder_of_runs(runs, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SHAKESPEARE_RUNS", str(runs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / "ablation.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    table = next(o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert "| bigram |" in table and "| head |" in table
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    grids = [run.attention_grid() for run in load_runs(runs) if run.attention_grid()]
    assert len(grids) == 2 and len(pictures) == 2 + len(grids)  # loss curves, loss by position, each rung's grid
    shown = [base64.b64decode(o.data["image/png"]) for o in pictures[2:]]
    assert shown == grids


def test_a_failed_sweep_job_is_listed_with_its_reason(runs, tmp_path):
    job = tmp_path / "3_model.num_heads-3"
    shutil.copytree(runs / "multiruns" / "2026-01-01" / "12-00-00" / "0_model-bigram" / ".hydra", job / ".hydra")
    (job / "failure.txt").write_text(
        "model.num_heads=3 does not divide model.embedding_size=32: each head gets "
        "embedding_size / num_heads channels. Pick num_heads among [1, 2, 4].\n"
    )
    [run] = load_runs(job)
    assert (
        run.status
        == "failed (model.num_heads=3 does not divide model.embedding_size=32: each head gets embedding_size / num_heads channels)"
    )


def composed(*overrides: str) -> dict:
    cfg = compose_train(Path("/nonexistent"), list(overrides))
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)


@pytest.mark.parametrize(
    "overrides, shown",
    [
        (["experiment=ladder", "model=bigram"], True),
        (["model=block_norm_dropout"], True),  # the default run is the log's final small model at its settings
        (["model=block_norm_dropout", "model.fused_attention=true"], True),  # the same function, faster
        (["experiment=scale_up"], True),
        (["experiment=modern_ladder", "rung=block_norm_dropout"], False),  # the same rung name, 4 blocks x 128
        (["model=head", "data.batch_size=32"], False),
        (["experiment=ladder", "model=bigram", "data=text8"], False),  # another corpus
    ],
)
@pytest.mark.slow
def test_the_logs_eval_loss_stands_only_beside_runs_at_its_settings(overrides, shown):
    from shakespeare.report.tables import markdown_table

    run = Run(path=Path("run"), name="run", config=composed(*overrides), scalars={"val/loss": [(1, 0.0, 2.0)]})
    log_column = markdown_table([run]).splitlines()[2].split(" | ")[5]
    assert (log_column != "-") == shown


@pytest.mark.slow  # trains runs (or reads a trained one) end to end
def test_budget_runs_show_their_budget_and_are_plotted_by_step():
    budget = Run(
        path=Path("a"),
        name="a",
        config=composed("experiment=cpu_speedrun", "trainer.max_time=00:00:02:00"),
        scalars={"val/loss": [(499, 1.0, 2.0), (999, 2.0, 1.8)], ELAPSED: [(999, 2.0, 118.0)]},  # as logged
    )
    steps = Run(
        path=Path("b"),
        name="b",
        config=composed(
            "model=bigram",
            "trainer.max_steps=2000",
            "trainer.max_epochs=-1",
            "trainer.val_check_interval=1000",
            "trainer.check_val_every_n_epoch=null",
        ),
        scalars={"val/loss": [(999, 1.0, 2.5), (1999, 2.0, 2.4)]},
    )
    epochs = Run(
        path=Path("c"),
        name="c",
        config=composed("model=bigram"),
        scalars={"val/loss": [(9, 1.0, 2.5), (19, 2.0, 2.4)], ELAPSED: [(9, 1.0, 3.0), (19, 2.0, 7.0)]},
    )
    assert (budget.trained, steps.trained, epochs.trained) == ("1,000 steps in 120 s", "2,000/2,000 steps", "2/10")
    assert budget.seconds_per_epoch is None and epochs.seconds_per_epoch == pytest.approx(3.5)  # the run's own clock
    assert budget.status == "finished" and steps.status == "finished"
    axis, points = validation_curves([budget, steps, epochs])
    assert axis == "step" and [x for _, x, _ in points] == [[500, 1000], [1000, 2000], [10, 20]]
    axis, points = validation_curves([epochs])
    assert axis == "epoch" and points[0][1] == [0, 1]


def test_runs_that_would_share_a_legend_label_are_told_apart():
    one = Run(path=Path("x/0_a"), name="0_a", config={"model": {"name": "bigram"}}, overrides=["seed=1"])
    two = Run(path=Path("x/1_a"), name="1_a", config={"model": {"name": "bigram"}}, overrides=["seed=1"])
    three = Run(path=Path("x/2_b"), name="2_b", config={"model": {"name": "head"}}, overrides=["seed=1"])
    assert labels([one, two, three]) == ["bigram (0_a)", "bigram (1_a)", "head"]


def test_a_configurations_seeds_share_one_colour_and_one_legend_entry():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shakespeare.report.figures import plot_by_configuration

    curves = [(f"{rung} seed={seed}", [0, 1], [2.0 + seed, 1.0]) for rung in ("head", "block") for seed in (1, 2, 3)]
    fig, ax = plt.subplots()
    plot_by_configuration(ax, [*curves, ("bigram seed=1", [0, 1], [3.0, 2.5])])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "head (3 seeds)",
        "block (3 seeds)",
        "bigram seed=1",
    ]
    assert len(ax.lines) == 7 and len({line.get_color() for line in ax.lines}) == 3
    plt.close(fig)


@pytest.mark.slow  # starts a process
def test_the_report_starts_without_lightning():
    """The report reads run folders and samples checkpoints: Lightning's import (seconds) is for training."""
    script = (
        "import sys\n"
        "import shakespeare.report.__main__\n"
        "loaded = [name for name in ('lightning', 'torchmetrics', 'scipy.stats') if name in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)


def test_report_samples_on_one_thread_and_says_which_run_it_samples(runs, monkeypatch, capsys):
    import torch

    import shakespeare.model.sampling as sampling

    threads, real = [], sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: threads.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    samples_section(load_runs(runs), length=20)
    assert threads and set(threads) == {1} and torch.get_num_threads() == before
    assert "Sampling 1/" in capsys.readouterr().err
