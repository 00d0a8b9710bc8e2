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
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from shakespeare.callbacks import BEST_VAL_LOSS
from shakespeare.cpu import keep_freed_memory, set_threads
from shakespeare.errors import UsageError
from shakespeare.module import ShakespeareModule

log = logging.getLogger("shakespeare")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


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


NOT_HYPERPARAMETERS = ("hydra", "paths", "logger", "ckpt_path", "callbacks", "data.url", "data.sha256", "data.cache_dir",
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
            if conf.min_delta:
                raise UsageError(
                    f"callbacks.early_stopping.min_delta={conf.min_delta} is set but patience is null, so early "
                    "stopping is off. Set callbacks.early_stopping.patience (epochs without improvement) too."
                )
            continue
        if name == "progress_bar" and not cfg.trainer.enable_progress_bar:
            continue
        callbacks.append(instantiate(conf))
    return callbacks


def check_sweep_strategy(trainer: L.Trainer) -> None:
    """Refuse `trainer=ddp` in a local `-m` sweep: it starts its extra processes by re-running the command,
    and each of them would run the whole sweep again."""
    if (
        isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
        and not trainer.strategy.cluster_environment.creates_processes_externally
        and trainer.num_devices > 1
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise UsageError(
            f"trainer.strategy=ddp with trainer.devices={trainer.num_devices} starts its extra processes by "
            "re-running this command, so inside a -m sweep every process would run the whole sweep again. In "
            "sweeps use trainer=ddp_spawn (the same training, processes started by Python's multiprocessing), "
            "or a launcher that starts one process per device itself (hydra/launcher=submitit_slurm)."
        )


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train one run as `cfg` describes and return its final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    check_accelerator(cfg.trainer.accelerator)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    set_threads(trainer_cfg.pop("threads", None))
    log.info("torch threads=%d", torch.get_num_threads())
    keep_freed_memory()
    datamodule = instantiate(cfg.data)
    module = ShakespeareModule(
        vocabulary=datamodule.tokenizer.vocabulary,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
    )
    log.info("model=%s", module.model)
    loggers = [instantiate(conf) for conf in (cfg.get("logger") or {}).values()]
    for logger in loggers:  # the HParams tab: these hyperparameters against the best validation loss so far
        logger.log_hyperparams(hyperparameters(cfg), metrics={BEST_VAL_LOSS: math.nan})
    trainer = instantiate(trainer_cfg, callbacks=build_callbacks(cfg), logger=loggers)
    check_sweep_strategy(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """`python train.py`: returns the best epoch validation loss, the value Hydra's sweepers minimise."""
    try:
        metrics = fit(cfg)
    except UsageError as err:
        log.error("%s", err)
        if HydraConfig.get().mode == RunMode.RUN:
            sys.exit(2)
        raise
    return metrics.get("val/loss_best")
