"""The private parts of Lightning, torch and Hydra this project leans on, each behind one function here.

No other module touches them. `HOOKS` names each one with a check that it is still where this code expects it;
tests/test_internals.py runs every check, so an upgrade that moves one fails naming it, instead of a run
misbehaving somewhere far from the cause.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.optim._muon as torch_muon
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

# Lightning


def reruns_the_command(trainer: L.Trainer) -> bool:
    """Whether the trainer's launcher starts (or started) its other processes by re-running this command (plain
    DDP), rather than Python's multiprocessing (ddp_spawn) or nothing at all (one process, torchrun, SLURM)."""
    return isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)


def stop_after_this_step(trainer: L.Trainer) -> None:
    """Lightning's own graceful stop: it finishes the step in flight, then raises SIGTERMException."""
    trainer._signal_connector.received_sigterm = True


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment:
    """The cluster the trainer detected (SLURM, torchrun, ...), also for one process, where the strategy has none."""
    return trainer._accelerator_connector.cluster_environment


def delay_child_observer(grace: float) -> None:
    """Lightning's DDP launcher SIGKILLs every process 5 s after one it started exits with an error. Give the
    survivors `grace` seconds first (the observer still cleans up after a survivor that hangs)."""
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver) and not getattr(thread, "_patient", False):
            thread._run, thread._patient = patiently(thread, thread._run, grace), True


def patiently(thread: Any, run: Callable[[], bool], grace: float) -> Callable[[], bool]:
    def patient_run() -> bool:
        if any(proc.poll() for proc in thread._child_processes):  # one ended with an error
            time.sleep(grace)  # this process says what happened and exits, or the observer ends it after all
        return run()

    return patient_run


# torch


def set_collective_timeout(seconds: float) -> None:
    """How long a collective of the default process group waits for the others, once they have all joined."""
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning rate for a matrix of `shape` (adjust_lr_fn: null/original or match_rms_adamw)."""
    return torch_muon._adjust_lr(lr, adjust_lr_fn, shape)


# Hydra: the launchers' loggers, which list each job's overrides as Hydra writes them, escapes and all
LAUNCHER_LOGGERS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)


def _trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def _logs_in(module: str) -> bool:
    """Whether `module` (a launcher) logs its job lines through the logger named after it."""
    import importlib
    import logging

    return importlib.import_module(module).log is logging.getLogger(module)


HOOKS: dict[str, Callable[[], bool]] = {
    "lightning: Trainer._signal_connector.received_sigterm": lambda: hasattr(
        _trainer()._signal_connector, "received_sigterm"
    ),
    "lightning: Trainer._accelerator_connector.cluster_environment": lambda: isinstance(
        cluster_environment(_trainer()), ClusterEnvironment
    ),
    "lightning: _SubprocessScriptLauncher (plain DDP's launcher)": lambda: callable(_SubprocessScriptLauncher.kill),
    "lightning: _ChildProcessObserver._run and ._child_processes": lambda: (
        callable(_ChildProcessObserver._run) and "_child_processes" in _ChildProcessObserver.__init__.__code__.co_names
    ),
    "torch: distributed_c10d._set_pg_timeout": lambda: callable(dist.distributed_c10d._set_pg_timeout),
    "torch: optim._muon._adjust_lr, Muon's learning rate for a matrix's shape": lambda: (
        muon_lr(0.02, None, torch.Size([512, 128])) == 0.02 * 2 and muon_lr(0.02, None, torch.Size([128, 512])) == 0.02
    ),
    **{f"hydra: the logger of {name}": (lambda name=name: _logs_in(name)) for name in LAUNCHER_LOGGERS},
}
