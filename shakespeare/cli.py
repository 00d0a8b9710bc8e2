"""Hydra entry points behind the root scripts: compose, instantiate, fit."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import TextIO

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, OmegaConf

from shakespeare.callbacks import BEST_VAL_LOSS
from shakespeare.checkpoint import load_module
from shakespeare.cpu import keep_freed_memory, set_threads
from shakespeare.errors import UsageError
from shakespeare.module import ShakespeareModule
from shakespeare.sampling import check_options, stream

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


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train one run as `cfg` describes and return its final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    check_accelerator(cfg.trainer.accelerator)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    set_threads(trainer_cfg.pop("threads", None))
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """`python train.py`: returns the best validation loss, the value Hydra's sweepers minimise."""
    try:
        metrics = fit(cfg)
    except UsageError as err:
        log.error("%s", err)
        if HydraConfig.get().mode == RunMode.RUN:
            sys.exit(2)
        raise
    return metrics.get("val/loss")


def check_device(name: str) -> torch.device:
    """The torch device to generate on, refused with the available ones when this machine lacks it."""
    available = [d for d in ("cpu", "cuda", "mps") if AcceleratorRegistry.get(d).is_available()]
    if str(name).split(":")[0] not in available:
        raise UsageError(f"device={name!r} is not available on this machine; available here: {', '.join(available)}.")
    return torch.device(name)


def write_samples(cfg: DictConfig, out: TextIO = sys.stdout) -> list[str]:
    """Sample from `cfg.ckpt_path` as `cfg` describes, streaming the text to `out`; returns the samples."""
    options = {key: cfg[key] for key in ("max_new_tokens", "temperature", "top_k", "num_samples")}
    check_options(**options)
    if not cfg.ckpt_path:
        raise UsageError(
            "ckpt_path is not set. Pass the checkpoint to write with, e.g. "
            "ckpt_path=outputs/<date>/<time>_<rung>/checkpoints/best.ckpt, or a run folder."
        )
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads={threads!r} must be a whole number of at least 1, or null for one per core.")
    if threads is not None:
        torch.set_num_threads(threads)
    device = check_device(cfg.device)
    module = load_module(cfg.ckpt_path, map_location=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed) if cfg.seed is not None else generator.seed()
    prompt = "" if cfg.prompt is None else str(cfg.prompt)
    steps = stream(module.model, module.tokenizer, prompt, generator=generator, on_unknown=cfg.on_unknown, **options)
    prompt = "".join(ch for ch in prompt if ch not in module.tokenizer.unknown(prompt))  # as the model read it
    texts = [[] for _ in range(cfg.num_samples)]
    if cfg.num_samples == 1:  # one sample streams character by character
        out.write(prompt)
        for (ch,) in steps:
            out.write(ch)
            out.flush()
            texts[0].append(ch)
        out.write("\n")
    else:  # samples are generated side by side, so each is printed once all are done
        for chars in steps:
            for text, ch in zip(texts, chars):
                text.append(ch)
        for i, text in enumerate(texts, 1):
            out.write(f"---------- Sample {i}/{cfg.num_samples}:\n{prompt}{''.join(text)}\n")
    out.flush()
    return ["".join(text) for text in texts]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def generate(cfg: DictConfig) -> None:
    """`python generate.py ckpt_path=... prompt=...`: stream a trained model's text to the terminal."""
    try:
        write_samples(cfg)
    except UsageError as err:
        log.error("%s", err)
        sys.exit(2)
    except KeyboardInterrupt:
        print(flush=True)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python generate.py ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
