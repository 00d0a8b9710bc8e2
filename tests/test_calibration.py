"""Equal time that load cannot bend: a budget becomes the steps a quiet reference rung buys, scaled by this rung's
speed measured against the reference in alternating bursts, and the run trains those steps whatever the load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import shakespeare.run.calibration as calibration
from shakespeare.cli.train import fit
from shakespeare.errors import UsageError

EQUAL_TIME = [
    "model=qk_norm",
    "model.embedding_size=16",
    "model.num_heads=2",
    "model.num_blocks=1",
    "equal_time.budget=00:00:00:04",
    "trainer.val_check_interval=10",
    "trainer.check_val_every_n_epoch=null",
    "trainer.limit_train_batches=null",
]


class Slow(L.Callback):
    """Sleeps after every training step: the machine got busy once the calibration was done."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        time.sleep(0.01)


@pytest.fixture
def step_times(monkeypatch):
    """A fake clock for the calibration: every step of the reference rung (block_norm_dropout) takes `reference`
    seconds, every step of the rung trained `run` seconds."""
    times = {"reference": 0.1, "run": 0.2}

    def timed(model, optimizer, batch, steps):
        return times["run"] if model.cfg.qk_norm else times["reference"]

    monkeypatch.setattr(calibration, "timed_steps", timed)
    return times


@pytest.mark.slow
def test_the_budget_buys_the_steps_the_quiet_reference_would_scaled_by_this_rungs_speed(step_times, tiny_cfg):
    cfg = tiny_cfg(*EQUAL_TIME, "+callbacks.slow._target_=tests.test_calibration.Slow")
    fit(cfg)  # 4 s at 0.1 s a reference step buy 40 reference steps; this rung's steps take twice as long: 20
    run = Path(cfg.paths.output_dir)
    record = json.loads((run / "calibration.json").read_text())
    assert record["steps"] == 20 and record["ratio"] == pytest.approx(2.0) and record["reference_quiet_step"] == 0.1
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert last == 20  # every step trained, though each took longer than the calibration measured


@pytest.mark.slow
def test_a_busy_machine_later_changes_the_ratio_not_the_quiet_reference(step_times, tiny_cfg, tmp_path):
    fit(tiny_cfg(*EQUAL_TIME))  # measures the reference's quiet step: 0.1 s, kept in the cache
    step_times.update(reference=0.3, run=0.6)  # a neighbour slows both sides alike
    cfg = tiny_cfg(*EQUAL_TIME)
    fit(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "calibration.json").read_text())
    assert record["steps"] == 20 and not record["measured_quiet_now"]  # the same steps as on the quiet machine


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["equal_time.budget=soon"], r"equal_time.budget='soon' is not a time budget"),
        (["equal_time.budget=00:00:00:04", "trainer.max_time=00:00:01:00"], r"two budgets: .*trainer.max_time=null"),
        (
            ["equal_time.budget=00:00:00:04", "equal_time.bursts=0"],
            r"equal_time.bursts=0 must be a whole number of at least 1",
        ),
        (
            ["equal_time.budget=00:00:00:04", "equal_time.reference=transformer"],
            r"equal_time.reference='transformer' is not a rung",
        ),
    ],
)
def test_bad_equal_time_settings_are_named(overrides, message, tiny_cfg):
    with pytest.raises(UsageError, match=message):
        fit(tiny_cfg(*overrides))


@pytest.mark.slow  # trains a few steps
def test_a_budget_too_short_for_one_step_is_refused(step_times, tiny_cfg):
    step_times.update(reference=10.0, run=20.0)
    with pytest.raises(UsageError, match=r"equal_time.budget=00:00:00:04 buys no step of this rung"):
        fit(tiny_cfg(*EQUAL_TIME, "equal_time.recalibrate=true"))
