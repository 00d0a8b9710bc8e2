"""Hydra entry points behind the root scripts: compose, instantiate, fit."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from shakespeare.checkpoints import AtomicCheckpointIO, check_resumable, find_run, read_checkpoint, resume_checkpoint
from shakespeare.composition import CONFIG_DIR, explained_composition
from shakespeare.config import check_config, check_with_data, rung_help
from shakespeare.cpu import flush_denormals, keep_freed_memory, set_threads
from shakespeare.errors import EXPLAINED, Interrupted, UsageError, speaks
from shakespeare.faults import explained
from shakespeare.module import BEST_VAL_LOSS, ShakespeareModule
from shakespeare.noise import silence_known_noise
from shakespeare.run_folder import discard_refused_run, folder_name, next_steps, shown
from shakespeare.sweep import record_failure, show_typed_overrides

log = logging.getLogger("shakespeare")

ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")

# A resumed run (ckpt_path=last, a run folder or its checkpoint) continues in its own folder (hydra.run.dir),
# with its Hydra record beside the original one (hydra.output_subdir); see conf/hydra/default.yaml.
def resumed_run(ckpt_path: str | None, log_dir: str) -> Path | None:
    try:
        return find_run(ckpt_path, log_dir)
    except UsageError:  # fit() raises it again, as a one-paragraph message instead of Hydra's traceback
        return None


OmegaConf.register_new_resolver(
    "run_dir", lambda ckpt_path, log_dir, new: str(resumed_run(ckpt_path, log_dir) or new), use_cache=True, replace=True
)
OmegaConf.register_new_resolver("rung_help", rung_help, use_cache=True, replace=True)  # python train.py --help
OmegaConf.register_new_resolver("folder_name", folder_name, use_cache=True, replace=True)  # pastes back unquoted
show_typed_overrides()
OmegaConf.register_new_resolver(
    "hydra_subdir",
    lambda ckpt_path, log_dir, now: f".hydra/resumed-{now}" if resumed_run(ckpt_path, log_dir) else ".hydra",
    use_cache=True,
    replace=True,
)


def build(conf: DictConfig | dict, key: str = "", **kwargs):
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


def check_accelerator(name: str) -> None:
    """Refuse an accelerator this machine lacks before Lightning does it with a traceback."""
    available = [a for a in ("cpu", "cuda", "mps") if AcceleratorRegistry.get(a).is_available()]
    wanted = {"gpu": ["cuda", "mps"]}.get(name, [name])
    if name not in ACCELERATORS:
        raise UsageError(f"trainer.accelerator={name!r} is not an accelerator; choose one of {', '.join(ACCELERATORS)}.")
    if name != "auto" and not set(wanted) & set(available):
        raise UsageError(
            f"trainer.accelerator={name} is not available on this machine; available here: "
            f"{', '.join(available)}. Use trainer.accelerator={available[-1]} (or auto, which picks the best one)."
        )


NOT_HYPERPARAMETERS = ("hydra", "paths", "logger", "ckpt_path", "checkpoint", "callbacks", "data.url", "data.sha256", "data.archive_sha256", "data.cache_dir",
                       "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary")


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


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Instantiate every callback in `cfg.callbacks`; early stopping only when `patience` is set."""
    callbacks = []
    for name, conf in (cfg.get("callbacks") or {}).items():
        if name == "early_stopping" and conf.patience is None:
            continue
        if name == "progress_bar" and not cfg.trainer.enable_progress_bar:
            continue
        callbacks.append(build(conf))
    return callbacks


def check_sweep_strategy(trainer: L.Trainer) -> None:
    """Refuse `trainer=ddp` in a local `-m` sweep: it starts its extra processes by re-running the command,
    and each of them would run the whole sweep again."""
    if (
        isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
        and not trainer.strategy.cluster_environment.creates_processes_externally
        and trainer.num_devices > 1
        and sweeping()
    ):
        raise UsageError(
            f"trainer.strategy=ddp with trainer.devices={trainer.num_devices} starts its extra processes by "
            "re-running this command, so inside a -m sweep every process would run the whole sweep again. In "
            "sweeps use trainer=ddp_spawn (the same training, processes started by Python's multiprocessing), "
            "or a launcher that starts one process per device itself (hydra/launcher=submitit_slurm)."
        )


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train one run as `cfg` describes and return its final metrics."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the config and the research log
    check_accelerator(cfg.trainer.accelerator)
    set_threads(cfg.host.threads)
    keep_freed_memory()
    flush_denormals()
    datamodule = build(cfg.data)
    check_with_data(cfg, datamodule)
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir, cfg.paths.log_dir)
    silence_known_noise(resuming=ckpt_path is not None)
    checkpoint = read_checkpoint(ckpt_path) if ckpt_path else None
    if checkpoint:
        check_resumable(checkpoint, ckpt_path, cfg, datamodule.tokenizer.vocabulary)
    module = ShakespeareModule(
        vocabulary=datamodule.tokenizer.vocabulary,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
    )
    log.info("model=%s", module.model)
    # a resumed run hides the steps logged after its checkpoint, so its curves continue without a fold
    resumed = {"purge_step": checkpoint["global_step"]} if checkpoint else {}
    loggers = [
        build(conf, **(resumed if conf._target_.endswith("TensorBoardLogger") else {}))
        for conf in (cfg.get("logger") or {}).values()
    ]
    trainer = build(cfg.trainer, "trainer", _convert_="all",  # plain dicts: trainer.max_time={minutes:10} is one
                    callbacks=build_callbacks(cfg), logger=loggers, plugins=[AtomicCheckpointIO()])
    check_sweep_strategy(trainer)
    for logger in loggers:  # the HParams tab: these hyperparameters against the best validation loss so far
        logger.log_hyperparams(hyperparameters(cfg), metrics={BEST_VAL_LOSS: math.nan})
    with explained(trainer, cfg):  # a signal, a lost process or a full disk: one message, what was kept
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if datamodule.has_test_split:  # the test text, read once, by the checkpoint with the best validation loss
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})
    return metrics


def train() -> None:
    """`python train.py`: a config Hydra cannot compose is one paragraph and exit 2; then `run`."""
    with explained_composition("train", "train.py"):
        run()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    """`python train.py`: returns the best epoch validation loss, the value Hydra's sweepers minimise."""
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
        print("Run folder: " + shown(cfg.paths.output_dir) if sweeping() else next_steps(cfg.paths.output_dir), flush=True)
    return metrics.get("val/loss_best")


def sweeping() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
