"""`python train.py`: the training recipe, phase by phase, and the Hydra entry point that runs it."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import shakespeare.run.resolvers  # noqa: F401  (the interpolations of conf/train.yaml)
from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.errors import EXPLAINED, Interrupted, UsageError, speaks
from shakespeare.internals import reruns_the_command
from shakespeare.run.calibration import EqualTime, calibrate, read_calibration, write_calibration
from shakespeare.run.checkpoints import AtomicCheckpointIO, check_resumable, load_training_checkpoint, resume_checkpoint
from shakespeare.run.checks import check_accelerator, check_config, check_with_data
from shakespeare.run.composition import CONFIG_DIR, explained_composition
from shakespeare.run.faults import explained
from shakespeare.run.folders import discard_refused_run, next_steps, shown
from shakespeare.run.host import flush_denormals, keep_freed_memory, set_threads, silence_known_noise
from shakespeare.run.sweep import record_failure, sweeping
from shakespeare.training.module import BEST_VAL_LOSS, ShakespeareModule

log = logging.getLogger("shakespeare")


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train one run as `cfg` describes and return its final metrics."""
    check(cfg)  # every key's type and range, and the accelerator, before anything is built
    prepare_host(cfg)  # torch's threads, the allocator, denormal floats, the seed
    datamodule = build_data(cfg)  # the text, its token cache and windows; a step that fits in memory
    ckpt_path, checkpoint = resume(cfg, datamodule)  # the checkpoint a resumed run continues, checked against cfg
    steps = equal_time(cfg, datamodule)  # in the equal-time mode, the steps the budget buys this rung
    module = build_module(cfg, datamodule)  # the rung, its optimizer and schedule, the tokenizer
    trainer = build_trainer(cfg, checkpoint, steps)  # Lightning's Trainer: callbacks, loggers, atomic checkpoints
    with explained(trainer, cfg):  # a signal, a lost process or a full disk: one message, what was kept
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return test(trainer, module, datamodule)  # the final metrics, and the test split read once by best.ckpt


def train() -> None:
    """`python train.py`: a config Hydra cannot compose is one paragraph and exit 2; then `run`."""
    with explained_composition("train", "train.py"):
        run()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    """One run (or one sweep job): returns the best validation loss, the value Hydra's sweepers minimise."""
    try:
        metrics = fit(cfg)
    except Interrupted as stop:  # a sweep stops too: the user asked for it
        if speaks(stop):  # once, not once per process
            log.error("%s", stop)
        sys.exit(stop.exit_code)
    except Exception as err:
        if sweeping():  # the sweep goes on; SweepSummary reports it at the end
            record_failure(err)
            return None  # no value: Optuna records a failed trial and searches on (a NaN crashes its sweeper)
        if isinstance(err, EXPLAINED):
            if speaks(err):
                log.error("%s", err)
            if isinstance(err, UsageError):
                discard_refused_run(cfg.paths.output_dir, HydraConfig.get().output_subdir, cfg.paths.log_dir)
            sys.exit(getattr(err, "exit_code", 2))
        raise
    if rank_zero_only.rank == 0:  # where the run is, and what reads it
        print(
            "Run folder: " + shown(cfg.paths.output_dir) if sweeping() else next_steps(cfg.paths.output_dir), flush=True
        )
    return metrics.get("val/loss_best")


# The phases of `fit`, in order.


def check(cfg: DictConfig) -> None:
    check_config(cfg)
    check_accelerator(cfg.trainer.accelerator)


def prepare_host(cfg: DictConfig) -> None:
    set_threads(cfg.host.threads)
    keep_freed_memory()
    flush_denormals()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the config and the research log


def build_data(cfg: DictConfig) -> ShakespeareDataModule:
    datamodule = build(cfg.data, "data")
    check_with_data(cfg, datamodule)
    return datamodule


def resume(cfg: DictConfig, datamodule: ShakespeareDataModule) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint file `ckpt_path` stands for (None: a fresh start) and its contents, refused when it was
    trained under another config or has nothing left to do."""
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir, cfg.paths.log_dir)
    if ckpt_path is None:
        return None, None
    checkpoint = load_training_checkpoint(ckpt_path)
    check_resumable(checkpoint, ckpt_path, cfg, datamodule.tokenizer)
    return ckpt_path, checkpoint


def equal_time(cfg: DictConfig, datamodule: ShakespeareDataModule) -> int | None:
    """The steps equal_time.budget buys this rung (None: the mode is off), calibrated once per run: a resumed
    run trains the steps its first session measured."""
    settings = EqualTime(**OmegaConf.to_container(cfg.equal_time, resolve=True))
    if settings.budget is None:
        return None
    run = Path(cfg.paths.output_dir)
    calibration = read_calibration(run)
    if calibration is None:
        with torch.random.fork_rng(devices=[]):  # the calibration's dropout draws are not the run's
            calibration = calibrate(cfg, len(datamodule.tokenizer), settings)
        write_calibration(calibration, run)
    log.info(
        "Equal time: %s at %s's quiet speed (%.3f s a step) buys this rung %s steps (its step %.2fx the reference's, "
        "load %s)",
        settings.budget,
        calibration.reference,
        calibration.reference_quiet_step,
        f"{calibration.steps:,}",
        calibration.ratio,
        "-" if calibration.load is None else f"{calibration.load:.2f}",
    )
    return calibration.steps


def build_module(cfg: DictConfig, datamodule: ShakespeareDataModule) -> ShakespeareModule:
    module = ShakespeareModule(
        vocabulary=datamodule.tokenizer.vocabulary,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        tokenizer=datamodule.tokenizer.definition,  # a BPE's, so the checkpoint alone decodes what the model writes
    )
    log.info("model=%s", module.model)
    return module


def build_trainer(cfg: DictConfig, checkpoint: dict[str, Any] | None, steps: int | None = None) -> L.Trainer:
    silence_known_noise(resuming=checkpoint is not None)
    # a resumed run hides the steps logged after its checkpoint, so its curves continue without a fold
    resumed = {"purge_step": checkpoint["global_step"]} if checkpoint else {}
    loggers = [
        build(conf, f"logger.{name}", **(resumed if conf._target_.endswith("TensorBoardLogger") else {}))
        for name, conf in (cfg.get("logger") or {}).items()
    ]
    budget = {"max_steps": steps, "max_epochs": -1} if steps else {}  # the equal-time mode's steps
    trainer = build(
        cfg.trainer,
        "trainer",
        _convert_="all",  # plain dicts: trainer.max_time={minutes:10} is one
        callbacks=build_callbacks(cfg),
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        **budget,
    )
    check_sweep_strategy(trainer)
    for logger in loggers:  # the HParams tab: these hyperparameters against the best validation loss so far
        logger.log_hyperparams(hyperparameters(cfg), metrics={BEST_VAL_LOSS: math.nan})
    return trainer


def test(trainer: L.Trainer, module: ShakespeareModule, datamodule: ShakespeareDataModule) -> dict[str, float]:
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if datamodule.has_test_split:  # the test text, read once, by the checkpoint with the best validation loss
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})
    return metrics


# What the phases build with.


def build(conf: DictConfig | dict, key: str = "", **kwargs: Any) -> Any:
    """Hydra's `instantiate`, with a bad value refused by the class it builds shown as a UsageError naming
    the config key instead of a traceback."""
    try:
        return instantiate(conf, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UsageError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            key = str(err).rsplit("full_key: ", 1)[-1].strip() if "full_key: " in str(err) else key
            raise UsageError(
                f"{key}: {conf.get('_target_')} refuses its settings ({type(cause).__name__}: {cause}). "
                "Check those values (`python train.py --cfg job` prints them)."
            ) from None
        raise


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Instantiate every callback in `cfg.callbacks`; early stopping only when `patience` is set."""
    callbacks = []
    for name, conf in (cfg.get("callbacks") or {}).items():
        if name == "early_stopping" and conf.patience is None:
            continue
        if name == "progress_bar" and not cfg.trainer.enable_progress_bar:
            continue
        callbacks.append(build(conf, f"callbacks.{name}"))
    return callbacks


def check_sweep_strategy(trainer: L.Trainer) -> None:
    """Refuse `trainer=ddp` in a local `-m` sweep: it starts its extra processes by re-running the command,
    and each of them would run the whole sweep again."""
    external = getattr(trainer.strategy, "cluster_environment", None)
    if (
        reruns_the_command(trainer)
        and not (external and external.creates_processes_externally)
        and trainer.num_devices > 1
        and sweeping()
    ):
        raise UsageError(
            f"trainer.strategy=ddp with trainer.devices={trainer.num_devices} starts its extra processes by "
            "re-running this command, so inside a -m sweep every process would run the whole sweep again. In "
            "sweeps use trainer=ddp_spawn (the same training, processes started by Python's multiprocessing), "
            "or a launcher that starts one process per device itself (hydra/launcher=submitit_slurm)."
        )


NOT_HYPERPARAMETERS = (
    "hydra",
    "paths",
    "logger",
    "ckpt_path",
    "checkpoint",
    "callbacks",
    "host",
    "data.url",
    "data.sha256",
    "data.archive_sha256",
    "data.cache_dir",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)


def hyperparameters(cfg: DictConfig) -> dict:
    """The run's resolved config as flat `group.key: value` pairs for TensorBoard's HParams tab: no `_target_`,
    no paths or logging plumbing; of the callbacks only early stopping's settings."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if key == "_target_" or name in NOT_HYPERPARAMETERS:
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value if value is None or isinstance(value, (int, float, str, bool)) else str(value)

    for key in cfg:
        if key not in NOT_HYPERPARAMETERS:
            value = cfg[key]
            walk({key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value}, "")
    stopping = (cfg.get("callbacks") or {}).get("early_stopping")
    if stopping is not None:
        flat.update({f"callbacks.early_stopping.{key}": stopping.get(key) for key in ("patience", "min_delta")})
    return flat
