"""Scaling out: DDP, parallel and SLURM sweeps, Optuna search, all through Lightning's and Hydra's engines."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from shakespeare.cli.train import fit
from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig
from shakespeare.training.module import ShakespeareModule
from tests.harness import compose_train, run_train


def tiny(corpus: Path, batch_size: int = 16) -> list[str]:
    return [
        f"data.path={corpus}",
        f"data.batch_size={batch_size}",
        "model=multihead",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
    ]


def best_val_loss(run: Path) -> float:
    """The lowest epoch validation loss a run recorded, read back from its last checkpoint."""
    return float(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["val_loss_best"])


def sweep_jobs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / "multiruns").glob("*/*/*") if p.is_dir() and p.name[0].isdigit())


def assert_complete(run: Path) -> None:
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list(run.glob("events.out.tfevents.*"))


@pytest.fixture(autouse=True)
def one_thread_each(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # host.threads: 1 unless a launcher divides the cores


@pytest.mark.slow  # trains
def test_the_best_validation_loss_is_returned_not_the_last(tiny_cfg, capsys):
    scripted = [
        "+callbacks.script._target_=tests.probes.ScriptedValLoss",
        "+callbacks.script.losses=[2.5,2.0,2.25,2.75]",
    ]
    metrics = fit(tiny_cfg("model=multihead", "trainer.max_epochs=4", *scripted))
    epochs = [float(v) for v in re.findall(r"Eval loss \t([\d.]+)", capsys.readouterr().out)]
    assert epochs == [2.5, 2.0, 2.25, 2.75]
    assert metrics["val/loss_best"] == pytest.approx(2.0) and metrics["val/loss"] == pytest.approx(2.75)


@pytest.mark.slow  # composes a sweep
def test_threads_follow_omp_num_threads_which_joblib_divides_between_jobs(tmp_path, monkeypatch):
    assert compose_train(tmp_path).host.threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert compose_train(tmp_path).host.threads == 3


@pytest.mark.slow  # composes a sweep
def test_ddp_in_a_sweep_is_refused_with_the_fix(tiny_cfg):
    cfg = tiny_cfg("trainer=ddp", "trainer.devices=2", "hydra.mode=MULTIRUN")
    with pytest.raises(
        UsageError, match="inside a -m sweep every process would run the whole sweep again.*trainer=ddp_spawn"
    ):
        fit(cfg)


def test_optuna_search_space_holds_only_valid_models(tmp_path):
    params = compose_train(tmp_path, ["hparams_search=optuna"]).hydra.sweeper.params
    assert set(params) == {"optimizer.lr", "model.embedding_size", "model.num_heads", "model.dropout"}
    parse = OverridesParser.create().parse_override
    sizes, heads = (parse(f"{key}={params[key]}").value().list for key in ("model.embedding_size", "model.num_heads"))
    for size, num_heads in itertools.product(sizes, heads):
        GeneratorConfig(
            vocab_size=65, sequence_length=8, attention="multihead", embedding_size=size, num_heads=num_heads
        )


def test_slurm_example_asks_for_one_task_and_gpu_per_device(tmp_path, monkeypatch):
    """The submitit launcher turns conf/hydra/launcher/slurm.yaml into the sbatch script it would submit."""
    submitit = pytest.importorskip("submitit")
    cfg = compose_train(
        tmp_path,
        [
            "hydra/launcher=slurm",
            f"paths.log_dir={tmp_path}",
            "trainer=ddp",
            "trainer.accelerator=gpu",
            "trainer.devices=4",
            "trainer.num_nodes=2",
        ],
    )
    scripts = []
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were here
    monkeypatch.setattr(
        submitit.AutoExecutor,
        "map_array",
        lambda executor, *_: scripts.append(executor._executor._make_submission_file_text("python", "0")) or [],
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["model.num_heads=4"]], initial_job_idx=0)
    (sbatch,) = scripts
    for line in (
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--time=240",
        "--signal=USR1@90",
        "--requeue",
    ):  # the requeue signal of Lightning's SLURM environment
        assert f"#SBATCH {line}" in sbatch


@pytest.mark.slow  # importing torch's compiler takes seconds
def test_compiled_model_keeps_the_plain_models_checkpoint_keys(tmp_path):
    cfg = compose_train(tmp_path, ["model=block_norm_dropout"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    plain = ShakespeareModule(["<|pad|>", *"abc"], model=model, optimizer={})
    compiled = ShakespeareModule(["<|pad|>", *"abc"], model={**model, "compile": True}, optimizer={})
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert compiled.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tiny_cfg, corpus):
    single = fit(tiny_cfg(*tiny(corpus, batch_size=32)[1:]))["val/loss_best"]
    result = run_train(["trainer=ddp", "trainer.devices=2", *tiny(corpus, batch_size=16)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*_multihead")
    assert_complete(run)  # rank 0 alone wrote checkpoints and events
    assert (result.stdout + result.stderr).count("Training completed") == 1
    assert best_val_loss(run) == pytest.approx(single, abs=1e-4)  # each window once per epoch over both ranks


@pytest.mark.slow
def test_sweep_with_ddp_spawn_trains_its_job_once(tmp_path, corpus):
    # with trainer=ddp the second process would re-run the sweep: a second job folder, or a hang
    result = run_train(["-m", "trainer=ddp_spawn", "trainer.devices=2", "model.num_heads=8", *tiny(corpus)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = sweep_jobs(tmp_path)
    assert_complete(job)
    assert (result.stdout + result.stderr).count("Training completed") == 1


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_sweep_leaves_one_complete_run_per_job(tmp_path, corpus, launcher):
    args = ["-m", f"hydra/launcher={launcher}", "model.num_heads=4,8", *tiny(corpus)]
    if launcher == "joblib":
        args.append("hydra.launcher.n_jobs=2")
    result = run_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sweep_jobs(tmp_path)
    assert [job.name.split("+")[1] for job in jobs] == ["model.num_heads-4", "model.num_heads-8"]
    share = max(os.cpu_count() // 2, 1) if launcher == "joblib" else 1  # joblib gives each of 2 jobs half the cores
    for job in jobs:
        assert_complete(job)
        assert f"torch threads={share}" in "".join(log.read_text() for log in job.glob("*.log"))


@pytest.mark.slow
def test_optuna_search_reports_its_best_trial(tmp_path, corpus):
    result = run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *tiny(corpus)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [job for job in sweep_jobs(tmp_path) if (job / "checkpoints").exists()]
    assert len(trials) == 3
    (results,) = (tmp_path / "outputs" / "multiruns").glob("*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == pytest.approx(min(best_val_loss(trial) for trial in trials), abs=1e-6)
    assert set(best["best_params"]) == {"optimizer.lr", "model.embedding_size", "model.num_heads", "model.dropout"}


@pytest.mark.slow
def test_optuna_search_goes_on_past_a_failed_trial(tmp_path, corpus):
    # num_heads=3 divides no embedding size: every such trial fails, the others train
    result = run_train(
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "model.num_heads=choice(3,4)", *tiny(corpus)],
        tmp_path,
    )
    trials = [job for job in sweep_jobs(tmp_path) if (job / "checkpoints").exists()]
    failed = [job for job in sweep_jobs(tmp_path) if (job / "failure.txt").exists()]
    assert len(trials) + len(failed) == 3 and trials and failed, result.stderr[-3000:]
    assert "Best value: " in result.stdout + result.stderr and result.returncode == 1  # 1: the sweep summary
