"""The training hot path logs what the log needs without paying Lightning's per-call cost every step."""

from __future__ import annotations

import lightning as L
import pytest

import shakespeare.cli as cli
from shakespeare.module import ShakespeareModule


class Recorder(L.Callback):
    """Every step's loss and, at each epoch's end, what the callbacks see as the epoch's train loss."""

    def __init__(self) -> None:
        self.losses, self.epoch_means = {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epoch_means[trainer.current_epoch] = float(trainer.callback_metrics["train/loss_epoch"])


def test_epoch_loss_is_the_mean_of_its_steps_and_steps_are_logged_at_the_cadence(tiny_cfg, monkeypatch):
    recorder, build, log, calls = Recorder(), cli.build_callbacks, ShakespeareModule.log, []
    monkeypatch.setattr(cli, "build_callbacks", lambda cfg: [*build(cfg), recorder])
    monkeypatch.setattr(ShakespeareModule, "log", lambda self, name, *a, **k: calls.append(name) or log(self, name, *a, **k))
    cli.fit(tiny_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=7", "trainer.log_every_n_steps=3"))
    for epoch, losses in recorder.losses.items():
        assert recorder.epoch_means[epoch] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert calls.count("train/loss_step") == 14 // 3  # steps 3, 6, 9, 12: what the logger writes, not every step
    assert calls.count("train/loss_epoch") == 2  # registered once an epoch, updated every step without self.log
