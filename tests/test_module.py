"""The training hot path logs what the log needs without paying Lightning's per-call cost every step."""

from __future__ import annotations

import lightning as L
import pytest

import shakespeare.cli.train as cli
from shakespeare.errors import UsageError
from shakespeare.training.module import ShakespeareModule


class Recorder(L.Callback):
    """Every step's loss, and after each validation the module's mean training loss of the interval it closed."""

    def __init__(self) -> None:
        self.losses, self.means = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.means.append((trainer.global_step, module.train_loss_mean))

    def on_train_epoch_end(self, trainer, module) -> None:  # after the epoch line, which closes an open interval
        if not self.means or self.means[-1][0] != trainer.global_step:
            self.means.append((trainer.global_step, module.train_loss_mean))


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "validation, intervals", [([], [7, 14]), (["trainer.val_check_interval=3"], [3, 6, 7, 10, 13, 14])]
)
def test_each_lines_train_loss_is_the_mean_of_its_steps_and_steps_are_logged_at_the_cadence(
    validation, intervals, tiny_cfg, monkeypatch
):
    recorder, build, log, calls = Recorder(), cli.build_callbacks, ShakespeareModule.log, []
    monkeypatch.setattr(cli, "build_callbacks", lambda cfg: [*build(cfg), recorder])
    monkeypatch.setattr(
        ShakespeareModule, "log", lambda self, name, *a, **k: calls.append(name) or log(self, name, *a, **k)
    )
    cli.fit(
        tiny_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=7", "trainer.log_every_n_steps=3", *validation)
    )
    closed = [0, *intervals]
    expected = [sum(recorder.losses[a:b]) / (b - a) for a, b in zip(closed, closed[1:]) if b - a]
    assert [step for step, _ in recorder.means] == [b for a, b in zip(closed, closed[1:]) if b - a]
    assert [mean for _, mean in recorder.means] == pytest.approx(expected, rel=1e-6)  # each the mean since the last
    assert calls.count("train/loss_step") == 14 // 3  # steps 3, 6, 9, 12: what the logger writes, not every step


def test_warmup_cosine_rises_then_decays_to_the_floor():
    from shakespeare.training.module import warmup_cosine

    factors = [warmup_cosine(step, total_steps=110, warmup_steps=10, min_lr_factor=0.1) for step in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert (
        factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    )


def test_scheduler_steps_the_learning_rate_every_step(tiny_cfg, monkeypatch):
    from shakespeare.training.module import warmup_cosine

    cfg = tiny_cfg(
        "optimizer=adamw",
        "scheduler=warmup_cosine",
        "scheduler.warmup_steps=2",
        "trainer.max_steps=6",
        "trainer.limit_train_batches=10",
        "trainer.gradient_clip_val=1.0",
    )
    seen = []

    class LearningRates(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    build = cli.build_callbacks
    monkeypatch.setattr(cli, "build_callbacks", lambda cfg: [*build(cfg), LearningRates()])
    cli.fit(cfg)
    factors = [warmup_cosine(step, total_steps=6, warmup_steps=2, min_lr_factor=0.1) for step in range(6)]
    assert seen == pytest.approx([cfg.optimizer.lr * f for f in factors], rel=1e-6)
    assert factors[0] < factors[1] == factors[2] == 1.0 > factors[3] > factors[5] > 0.1


@pytest.mark.parametrize(
    "scheduler, named",
    [
        ({"warmup_steps": -1}, "scheduler.warmup_steps=-1"),
        ({"min_lr_factor": 2}, "scheduler.min_lr_factor=2"),
        ({"warmup": 5}, "scheduler.warmup is not a setting"),
    ],
)
def test_bad_scheduler_values_are_named(scheduler, named):
    with pytest.raises(UsageError, match=named):
        ShakespeareModule(
            ["<|pad|>", "a"], {"attention": "none", "sequence_length": 8}, {"_target_": "torch.optim.Adam"}, scheduler
        )
