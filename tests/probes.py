"""Callbacks that tests inject with `+callbacks.<name>._target_=tests.probes.<Class>` to stage accidents."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class PauseAt(L.Callback):
    """After training step `step`, prints `paused at step <step>` and waits for a signal (at most a minute),
    so a test can send it at a known step instead of guessing with sleeps. With `rank`, only that process
    of a multi-process run pauses (the others go on to the next step's collectives and wait there); with
    `until`, it waits for that file to exist instead of a signal."""

    def __init__(self, step: int, rank: int | None = None, until: str | None = None):
        self.step, self.rank, self.until = step, rank, until

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        print(f"paused at step {self.step}", flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (Path(self.until).exists() if self.until else signalled(trainer)):
            time.sleep(0.01)


def signalled(trainer: L.Trainer) -> bool:
    """Whether this process received a stop signal (on several processes it only takes note of it)."""
    stop = next((c for c in trainer.callbacks if type(c).__name__ == "InterruptCheckpoint"), None)
    return trainer.received_sigterm or bool(stop is not None and stop._received)


class SignalSelfAt(L.Callback):
    """After training step `step`, process `rank` sends itself `signal` (SIGKILL: dies, SIGSTOP: stops
    answering), in the run's first session only (not once it was resumed from a checkpoint)."""

    def __init__(self, step: int, rank: int, signal: str):
        self.step, self.rank, self.signal = step, rank, signal

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and trainer.ckpt_path is None:
            print(f"rank {self.rank} sends itself {self.signal} after step {self.step} (pid {os.getpid()})", flush=True)
            os.kill(os.getpid(), getattr(signal, self.signal))


class RecordStop(L.Callback):
    """Writes `<folder>/rank<r>.txt` with the step each process stopped after, when an exception stops it."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(
            f"{trainer.global_step} {type(exception).__name__}\n"
        )


class PoisonAt(L.Callback):
    """Before training step `step` (counting from 1), turns the weights to NaN, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.fill_(float("nan"))


class SignalAt(L.Callback):
    """After training step `step`, sends this process SIGTERM, as a scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)


class ScriptedValLoss(L.Callback):
    """Makes the i-th validation's loss `losses[i]` (the last one repeats), so a test controls the trajectory
    that early stopping, checkpoints and the best-loss bookkeeping see: the same numbers on any CPU."""

    def __init__(self, losses: list[float]):
        self.losses, self.validations = list(losses), 0

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = torch.tensor(float(self.losses[min(self.validations, len(self.losses) - 1)]))
        module.model.losses = lambda idx, targets: value.expand(
            targets.shape
        )  # shadows the method for this validation only

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            del module.model.losses
            self.validations += 1
