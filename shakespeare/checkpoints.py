"""Checkpoints that survive crashes: atomic writes, a save on SIGINT/SIGTERM, exact resumption of a run folder."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from shakespeare.config import time_budget
from shakespeare.errors import UsageError

LAST = "last.ckpt"
SIGNAL_LOG = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target, syncs it and renames it over the target, so a crash (even
    `kill -9`) leaves either the previous checkpoint or the new one, never a half-written file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as out:
            torch.save(checkpoint, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)


class RandomState(L.Callback):
    """Carries the global random state (dropout draws from it) in the checkpoint, so a resumed run draws
    the very numbers the uninterrupted run would have drawn."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class InterruptCheckpoint(Checkpoint):
    """Saves `dirpath/last.ckpt` when the run is stopped by SIGTERM or Ctrl-C.

    Lightning finishes the step in flight on SIGTERM and then raises `SIGTERMException`; a first Ctrl-C is
    turned into the same SIGTERM, so the checkpoint always holds a whole step. A second Ctrl-C stops at
    once without saving (the periodic last.ckpt stays).
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.signal: str | None = None  # SIGINT or SIGTERM once one stopped the run
        self.saved_step: int | None = None
        self._start_step: int | None = None
        self._previous_sigint: Any = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / LAST

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._first_ctrl_c)

    def _first_ctrl_c(self, signum: int, frame: Any) -> None:
        self.signal = "SIGINT"
        signal.signal(signal.SIGINT, self._previous_sigint)
        rank_zero_info("\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to quit without saving) ...")
        SIGNAL_LOG.addFilter(self._own_sigterm)  # Lightning would announce the SIGTERM as if the user had sent one
        signal.raise_signal(signal.SIGTERM)

    @staticmethod
    def _own_sigterm(record: logging.LogRecord) -> bool:
        return "Received SIGTERM" not in record.getMessage()

    def _restore_sigint(self) -> None:
        SIGNAL_LOG.removeFilter(self._own_sigterm)
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"  # a second Ctrl-C, or one before training started: the step may be half done
        elif isinstance(exception, SIGTERMException):
            self.signal = self.signal or "SIGTERM"
            if self._start_step is not None and trainer.global_step > self._start_step:
                trainer.save_checkpoint(self.ckpt_path, weights_only=False)
                self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_sigint()


def find_run(ckpt_path: str | None, log_dir: str) -> Path | None:
    """The run folder a `ckpt_path` resumes in place: `last` (the newest run under `log_dir` with a
    last.ckpt), a run folder, or a checkpoint inside `<run>/checkpoints/`; None for any other checkpoint."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        runs = [p.parent.parent for p in Path(log_dir).expanduser().glob(f"*/*/checkpoints/{LAST}")]
        if not runs:
            raise UsageError(
                f"ckpt_path=last found no run to resume: no {Path(log_dir) / '<date>/<time>_<rung>/checkpoints'}/"
                f"{LAST}. Pass the run folder or checkpoint instead, e.g. ckpt_path=outputs/<date>/<time>_<rung>."
            )
        return max(runs, key=lambda run: (run / "checkpoints" / LAST).stat().st_mtime)
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        if not (path / "checkpoints" / LAST).is_file():
            raise UsageError(
                f"ckpt_path={ckpt_path!r} is a folder without checkpoints/{LAST}, so there is nothing to resume. "
                "Pass a run folder (outputs/<date>/<time>_<rung>) or a .ckpt file."
            )
        return path
    if not path.is_file():
        raise UsageError(
            f"ckpt_path={ckpt_path!r} does not exist. Pass a checkpoint file, a run folder "
            "(outputs/<date>/<time>_<rung>) or ckpt_path=last (the newest run)."
        )
    return path.parent.parent if path.parent.name == "checkpoints" else None


def resume_checkpoint(ckpt_path: str | None, output_dir: str, log_dir: str) -> Path | None:
    """The checkpoint file `ckpt_path` stands for: a file as is; a run folder's last.ckpt; for `last`, the
    last.ckpt of the run Hydra's `run_dir` resolver picked as this run's `output_dir`."""
    if ckpt_path is None:
        return None
    run = find_run(ckpt_path, log_dir)  # a missing path, or no run to resume: a clear error
    path = Path(ckpt_path).expanduser()
    if ckpt_path == "last":
        own = Path(output_dir) / "checkpoints" / LAST
        return own if own.is_file() else run / "checkpoints" / LAST
    return path / "checkpoints" / LAST if path.is_dir() else path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint's plain data, or explain in one paragraph why `path` is not one."""
    if not path.is_file():
        raise UsageError(
            f"ckpt_path: {str(path)!r} does not exist (a run folder with nothing to resume, or a mistyped path). "
            "Pass a checkpoint file, a run folder (outputs/<date>/<time>_<rung>) or ckpt_path=last."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or not plain data
        raise UsageError(
            f"ckpt_path: {str(path)!r} is not a readable training checkpoint: it is truncated, or not a file "
            f"written by train.py ({type(err).__name__}). Pass a .ckpt from a run's checkpoints/ folder."
        ) from None
    if not isinstance(checkpoint, dict) or "loops" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UsageError(
            f"ckpt_path: {str(path)!r} is not a training checkpoint of this project (it lacks the trainer state). "
            "Pass a .ckpt written by train.py."
        )
    return checkpoint


TRAINING_DATA_KEYS = ("sequence_length", "batch_size", "stride", "split", "val_fraction", "test_fraction", "unit", "seed")


def plain(node: DictConfig | None) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str) -> list[str]:
    return [
        f"{prefix}.{key}={wanted.get(key)!r} (the checkpoint has {saved.get(key)!r})"
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
    ]


def resume_command(overrides: list[str], ckpt_path: str | Path) -> str:
    """The command line that resumes a run: its overrides (any old ckpt_path dropped) and the checkpoint."""
    kept = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") == "ckpt_path"]
    return shlex.join(["python", "train.py", *kept, f"ckpt_path={ckpt_path}"])


def check_resumable(checkpoint: dict[str, Any], path: Path, cfg: DictConfig, vocabulary: list[str]) -> None:
    """Refuse to resume a checkpoint under a config it was not trained with, or one with nothing left to do."""
    hparams, data = checkpoint["hyper_parameters"], checkpoint.get("datamodule_hyper_parameters", {})
    wanted_data = plain(cfg.data)
    changed = [
        *differences(hparams.get("model", {}), plain(cfg.model), "model"),
        *differences(hparams.get("optimizer", {}), plain(cfg.optimizer), "optimizer"),
        *differences(hparams.get("scheduler") or {}, plain(cfg.get("scheduler")), "scheduler"),
        *differences(
            {k: data[k] for k in TRAINING_DATA_KEYS if k in data},
            {k: wanted_data.get(k) for k in TRAINING_DATA_KEYS if k in data},
            "data",
        ),
    ]
    if not changed and hparams.get("vocabulary") != vocabulary:
        changed.append("the corpus (its characters differ from the ones the checkpoint was trained on)")
    if changed:
        run = path.parent.parent
        overrides = run / ".hydra" / "overrides.yaml"
        hint = "Pass the settings it was trained with"
        if path.parent.name == "checkpoints" and overrides.is_file():
            hint = f"Resume it with the overrides it was trained with: {resume_command(OmegaConf.load(overrides), run)}"
        raise UsageError(
            f"ckpt_path: {str(path)!r} was trained with a different configuration, so it cannot resume this one: "
            f"{'; '.join(changed)}. {hint}."
        )
    done = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    if cfg.trainer.max_epochs not in (None, -1) and done >= cfg.trainer.max_epochs:
        raise UsageError(
            f"ckpt_path: {str(path)!r} already trained its {done} epochs (trainer.max_epochs={cfg.trainer.max_epochs}), "
            f"so there is nothing to resume. To train it longer, raise trainer.max_epochs, e.g. "
            f"trainer.max_epochs={done * 2}."
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps not in (None, -1) and checkpoint["global_step"] >= max_steps:
        raise UsageError(
            f"ckpt_path: {str(path)!r} already trained its {checkpoint['global_step']} steps "
            f"(trainer.max_steps={max_steps}), so there is nothing to resume. To train it longer, raise "
            f"trainer.max_steps, e.g. trainer.max_steps={max_steps * 2}."
        )
    budget = time_budget(cfg.trainer.get("max_time"))
    spent = checkpoint.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train")
    if budget is not None and spent is not None and spent >= budget:
        raise UsageError(
            f"ckpt_path: {str(path)!r} already trained for its {spent:.0f} s of trainer.max_time "
            f"({cfg.trainer.max_time}), so there is nothing to resume. To train it longer, raise trainer.max_time, "
            f"e.g. trainer.max_time={{seconds:{int(spent) * 2}}}."
        )
    stopped = [s["stopped_epoch"] for k, s in checkpoint.get("callbacks", {}).items() if k.startswith("EarlyStopping")]
    if stopped and stopped[0]:
        raise UsageError(
            f"ckpt_path: {str(path)!r} was stopped early at epoch {stopped[0]} (val/loss had stopped improving), "
            "so there is nothing to resume; its best.ckpt holds the best weights."
        )
