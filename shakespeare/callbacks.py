"""Callbacks that speak the research log's language."""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


def console(trainer: L.Trainer, line: str) -> None:
    """Print above Lightning's progress bar instead of through it."""
    bar = trainer.progress_bar_callback
    if bar is not None and hasattr(bar, "print"):
        bar.print(line)
    else:
        print(line, flush=True)


class EpochLine(L.Callback):
    """Prints the log's line per epoch, `9/10 -- 6.50s  Train loss 2.4529  Eval loss 2.4542 <<`
    (`<<` marks a new best eval loss), and `Training completed. Elapsed time: ...` at the end."""

    def __init__(self) -> None:
        self.best = math.inf
        self.elapsed = 0.0  # over all sessions of a resumed run

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._session_start = time.perf_counter()
        self._elapsed_before = self.elapsed

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.elapsed = self._elapsed_before + time.perf_counter() - self._session_start
        metrics = trainer.callback_metrics
        train, val = metrics.get("train/loss_epoch"), metrics.get("val/loss")
        line = f"{trainer.current_epoch}/{trainer.max_epochs} -- {time.perf_counter() - self._epoch_start:.2f}s"
        if train is not None:
            line += f" \tTrain loss \t{train:.4f}"
        if val is not None:
            line += f" \tEval loss \t{val:.4f} \t"
            if val < self.best:
                self.best = float(val)
                line += "<<"
        console(trainer, line)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        console(trainer, f"Training completed. Elapsed time: {self.elapsed:.2f}s")

    def state_dict(self) -> dict:
        return {"best": self.best, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.elapsed = state["best"], state["elapsed"]
