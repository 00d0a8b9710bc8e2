"""Any time budget, one override: trainer.max_time ends every run annealed, resumed runs included; the modern
ladder trains every rung for one budget and the report compares them.

Lightning's Timer (the clock that stops a run at trainer.max_time) reads a fake clock here that advances
one second per training step, so the tests never sleep and never depend on the machine's speed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import lightning.pytorch.callbacks.timer as lightning_timer
import pytest
import torch
from omegaconf import OmegaConf

import shakespeare.cli.train as cli
from shakespeare.errors import Interrupted, UsageError
from shakespeare.report.runs import Run
from shakespeare.report.tables import budget_table
from shakespeare.training.module import warmup_cosine
from tests.harness import compose_train

BUDGET = 10  # seconds of fake time: ten training steps
RUN = [
    "model=block_norm_dropout",
    "data.batch_size=32",
    "trainer.max_epochs=-1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    f"trainer.max_time=00:00:00:{BUDGET:02d}",
    "optimizer=adamw",
    "scheduler=warmup_cosine",
    "scheduler.warmup_steps=2",
    "checkpoint.every_n_steps=3",
]


class FakeClock(L.Callback):
    """The Timer's `time` module: one second passes during each training step, none anywhere else."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.learning_rates: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        self.learning_rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.now += 1.0


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock(start=1000.0)
    monkeypatch.setattr(lightning_timer, "time", fake)
    build = cli.build_callbacks
    monkeypatch.setattr(cli, "build_callbacks", lambda cfg: [*build(cfg), fake])
    return fake


def expected_learning_rates(lr: float, steps: range, warmup_steps: int = 2) -> list[float]:
    """Step n's rate: warm-up over 2 steps, then cosine over the time spent when step n-1 ended (n of 10 s)."""
    return [lr * warmup_cosine(n, float("inf"), warmup_steps, 0.1, time_spent=n / BUDGET) for n in steps]


@pytest.mark.slow
@pytest.mark.parametrize("max_time", [f"00:00:00:{BUDGET:02d}", f"{{seconds:{BUDGET}}}"])
def test_the_learning_rate_follows_the_elapsed_fraction_of_max_time_and_ends_annealed(
    max_time, clock, corpus, tmp_path
):
    cfg = compose_train(tmp_path / "run", [f"data.path={corpus}", *RUN, f"trainer.max_time={max_time}"])
    cli.fit(cfg)
    assert len(clock.learning_rates) == BUDGET  # the Timer stopped the run when the budget was spent
    assert clock.learning_rates == pytest.approx(expected_learning_rates(cfg.optimizer.lr, range(BUDGET)), rel=1e-6)
    assert clock.learning_rates[-1] < 0.15 * cfg.optimizer.lr  # the last steps are annealed
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["callbacks"]["Timer"]["time_elapsed"]["train"] == pytest.approx(BUDGET)
    log = (tmp_path / "run" / "research_log.md").read_text()
    assert re.findall(r"^(step \d+ \(\d+ s of \d+ s\)) -- ", log, re.M) == [  # the budget, never epoch 0/-1
        "step 4 (4 s of 10 s)",
        "step 8 (8 s of 10 s)",
        "step 10 (10 s of 10 s)",
    ]
    assert "max_time=10s" in log and ", epochs=" not in log


@pytest.mark.slow
def test_a_time_budget_without_a_scheduler_still_ends_annealed(clock, corpus, tmp_path):
    cfg = compose_train(tmp_path / "run", [f"data.path={corpus}", *RUN[:-3]])  # Adam at a constant rate, as the log
    assert cfg.get("scheduler") is None
    cli.fit(cfg)
    assert clock.learning_rates[0] == cfg.optimizer.lr  # no warm-up: the rung's rate, then the decay over the budget
    assert clock.learning_rates == pytest.approx(expected_learning_rates(cfg.optimizer.lr, range(BUDGET), 0), rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_counts_the_time_already_spent(clock, corpus, tmp_path):
    args = [f"data.path={corpus}", *RUN]
    cli.fit(compose_train(tmp_path / "reference", args))
    reference = clock.learning_rates[:]
    clock.learning_rates.clear()
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="Saved .* at step 4 "):
        cli.fit(compose_train(run, [*args, "+callbacks.stop._target_=tests.probes.SignalAt", "+callbacks.stop.step=4"]))
    clock.now += 3600  # an hour passes between the sessions: it is not the run's time
    cli.fit(compose_train(run, [*args, f"ckpt_path={run}"]))
    assert len(clock.learning_rates) == BUDGET  # 4 + 6 steps: the resumed session had 6 s left, not 10
    assert clock.learning_rates == pytest.approx(reference, rel=1e-6)
    got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    want = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == BUDGET
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match=r"already trained for its 10 s of trainer.max_time .* raise trainer.max_time"):
        cli.fit(compose_train(run, [*args, f"ckpt_path={run}"]))


@pytest.mark.parametrize("value", ["00:10:00", "ten minutes", "00:00:00:00"])
def test_a_bad_max_time_is_named_with_the_format(value, tiny_cfg):
    with pytest.raises(
        UsageError, match=f"trainer.max_time='{value}' is not a time budget: write days:hours:minutes:seconds"
    ):
        cli.fit(tiny_cfg(f"trainer.max_time='{value}'"))


def test_time_spent_counts_in_the_cosine_once_past_the_warm_up():
    assert warmup_cosine(0, float("inf"), 10, 0.1, time_spent=0.5) == pytest.approx(0.1)  # warming up
    assert warmup_cosine(8, float("inf"), 10, 0.1, time_spent=0.9) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(0.9 * math.pi))
    )
    assert warmup_cosine(20, float("inf"), 10, 0.1, time_spent=0.5) == pytest.approx(0.55)
    assert warmup_cosine(20, float("inf"), 10, 0.1, time_spent=1.0) == pytest.approx(0.1)
    assert warmup_cosine(20, 30, 10, 0.0, time_spent=0.0) == pytest.approx(0.5)  # steps further along than time
    assert warmup_cosine(20, 30, 10, 0.0, time_spent=1.0) == pytest.approx(0.0)  # time further along than steps


LADDER_RUNGS = ["block_norm_dropout", "rmsnorm", "rope", "relu2", "qk_norm", "muon", "ngram"]


@pytest.mark.slow
def test_the_modern_ladder_sweeps_every_rung_from_block_norm_dropout_up_for_one_budget(tmp_path):
    sweep = compose_train(tmp_path, ["experiment=modern_ladder"]).hydra.sweeper.params
    assert sweep["rung"].split(",") == LADDER_RUNGS
    jobs = {rung: compose_train(tmp_path, ["experiment=modern_ladder", f"rung={rung}"]) for rung in LADDER_RUNGS}
    assert [cfg.model.name for cfg in jobs.values()] == LADDER_RUNGS
    assert [cfg.optimizer._target_.rsplit(".", 1)[-1] for cfg in jobs.values()] == ["AdamW"] * 5 + ["MuonAdamW"] * 2
    assert jobs["muon"].model.keys() == jobs["qk_norm"].model.keys() == jobs["ngram"].model.keys()
    assert {k: v for k, v in jobs["muon"].model.items() if k != "name"} == {
        k: v for k, v in jobs["qk_norm"].model.items() if k != "name"
    }
    assert {k for k, v in jobs["ngram"].model.items() if jobs["muon"].model[k] != v} == {"name", "ngrams"}
    assert {OmegaConf.select(cfg, "equal_time.budget") for cfg in jobs.values()} == {"00:00:02:00"}  # equal time
    for key in (
        "trainer.max_time",
        "model.embedding_size",
        "model.num_blocks",
        "data.sequence_length",
        "model.dropout",
    ):
        assert len({str(OmegaConf.select(cfg, key)) for cfg in jobs.values()}) == 1, key


def test_the_report_gives_each_rungs_loss_at_the_budget_and_its_gain_over_the_rung_before():
    def run(rung: str, losses: list[float], max_time: str | None = "00:00:02:00") -> Run:
        return Run(
            path=Path(rung),
            name=rung,
            config={"model": {"name": rung}, "trainer": {"max_time": max_time}},
            scalars={"val/loss": [(100 * (i + 1) - 1, 0.0, loss) for i, loss in enumerate(losses)]},  # as logged
        )

    table = budget_table(
        [
            run("block_norm_dropout", [2.0, 1.8]),
            run("rmsnorm", [1.9, 1.85]),
            run("rope", [1.7]),
            run("bigram", [2.5], max_time=None),
        ]
    )
    assert table.splitlines()[2:] == [
        "| block_norm_dropout | 120 s | 200 | 1.8000 | - |",
        "| rmsnorm | 120 s | 200 | 1.8500 | -0.0500 |",
        "| rope | 120 s | 100 | 1.7000 | +0.1500 |",
    ]
    assert budget_table([run("bigram", [2.5], max_time=None)]) == ""


@pytest.mark.slow  # trains
def test_a_step_budget_ends_with_a_validation_of_its_last_step(tiny_cfg, capsys):
    cfg = tiny_cfg(
        "trainer.max_epochs=-1",
        "trainer.max_steps=7",
        "trainer.val_check_interval=5",
        "trainer.check_val_every_n_epoch=null",
        "trainer.limit_train_batches=null",
    )
    cli.fit(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" -- ")[0] for line in lines] == ["step 5/7", "step 7/7"] and "Eval loss" in lines[-1]
