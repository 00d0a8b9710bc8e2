"""Callbacks that tests inject with `+callbacks.<name>._target_=tests.probes.<Class>` to stage accidents."""

from __future__ import annotations

import signal
import time

import lightning as L
import torch


class PauseAt(L.Callback):
    """After training step `step`, prints `paused at step <step>` and waits for a signal (at most a minute),
    so a test can send it at a known step instead of guessing with sleeps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        print(f"paused at step {self.step}", flush=True)
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.01)


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
        module.model.losses = lambda idx, targets: value.expand(targets.shape)  # shadows the method for this validation only

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            del module.model.losses
            self.validations += 1
