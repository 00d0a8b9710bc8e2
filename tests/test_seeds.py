"""Comparisons a researcher can trust: runs that differ only in their seed are summarised with their spread, and a
rung's gain over the rung before is a paired comparison over the shared seeds, marked significant or not."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from shakespeare.report.seeds import Summary, configurations, gain, seeds_section


def scripted(rung: str, seed: int, best: float, final: float | None = None, corpus: str = "tinyshakespeare.txt"):
    """A run folder as the report reads it: `best` its lowest validation loss, `final` its last one."""
    from shakespeare.report.runs import Run

    config = {
        "model": {"name": rung},
        "seed": seed,
        "data": {"file": corpus, "split": "contiguous"},
        "trainer": {"max_epochs": 2},
    }
    values = [best, best + 0.1 if final is None else final]
    return Run(
        path=Path(f"{rung}-{seed}"),
        name=f"{rung}-{seed}",
        config=config,
        scalars={"val/loss": [(i + 1, 0.0, value) for i, value in enumerate(values)]},
    )


def test_a_summary_is_the_mean_the_spread_and_students_interval():
    summary = Summary.of([1.0, 1.2, 1.4])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (summary.n, summary.mean, summary.sd) == (3, pytest.approx(1.2), pytest.approx(0.2))
    assert (summary.low, summary.high) == (pytest.approx(1.2 - half), pytest.approx(1.2 + half))
    assert Summary.of([1.5]).sd is None and Summary.of([1.5]).shown() == "1.5000"


def test_a_gain_is_paired_over_the_shared_seeds_and_marked():
    before = {seed: scripted("rope", seed, loss) for seed, loss in ((1, 1.70), (2, 1.72), (3, 1.68), (4, 1.9))}
    after = {seed: scripted("relu2", seed, loss) for seed, loss in ((1, 1.60), (2, 1.60), (3, 1.60))}
    groups = configurations([*before.values(), *after.values()], ["rope"] * 4 + ["relu2"] * 3)
    found = gain(*groups)
    assert found.seeds == 3  # seed 4 has no partner
    assert found.summary.mean == pytest.approx(0.1) and found.summary.sd == pytest.approx(0.02)
    t = 0.1 / (0.02 / math.sqrt(3))
    assert found.p == pytest.approx(2 * stats.t.sf(t, 2)) and found.significant  # p = 0.013
    noisy = configurations(
        [scripted("rope", s, x) for s, x in ((1, 1.70), (2, 1.62), (3, 1.66))]
        + [scripted("relu2", s, x) for s, x in ((1, 1.65), (2, 1.66), (3, 1.65))],
        ["rope"] * 3 + ["relu2"] * 3,
    )
    assert not gain(*noisy).significant


def test_the_report_shows_seeds_only_where_there_are_several():
    one_each = [scripted("rope", 1, 1.7), scripted("relu2", 1, 1.6)]
    assert seeds_section(one_each, ["rope", "relu2"]) == ""  # a folder with one seed per configuration reads as today
    runs = [scripted("rope", s, 1.70 + s / 100) for s in (1, 2, 3)] + [
        scripted("relu2", s, 1.60 + s / 100) for s in (1, 2, 3)
    ]
    section = seeds_section(runs, [f"rope seed={s}" for s in (1, 2, 3)] + [f"relu2 seed={s}" for s in (1, 2, 3)])
    assert (
        "| rope | 3 (1, 2, 3) | 1.7200 ± 0.0100 [" in section and "| relu2 | 3 (1, 2, 3) | 1.6200 ± 0.0100 [" in section
    )
    assert "| relu2 | rope | 3 | +0.1000 [+0.1000, +0.1000] | 0 | yes |" in section
    alone = seeds_section(runs[:3], [f"rope seed={s}" for s in (1, 2, 3)])
    assert "| rope | 3 (1, 2, 3) |" in alone and "gain" not in alone  # one configuration: nothing to compare


def test_repeated_seeds_count_once_and_other_texts_are_not_compared():
    runs = [
        scripted("rope", 1, 1.70),
        scripted("rope", 1, 1.75),
        scripted("rope", 2, 1.71),
        scripted("relu2", 1, 1.6, corpus="text8"),
        scripted("relu2", 2, 1.61, corpus="text8"),
    ]
    section = seeds_section(runs, ["rope", "rope", "rope", "relu2", "relu2"])
    assert "| rope | 2 (1, 2) |" in section and "Counted once" in section and "rope-1 (seed 1, as rope-1)" in section
    assert "not compared: another text or split" in section


@pytest.mark.slow  # trains
def test_the_run_folder_and_the_research_log_show_the_seed(tiny_cfg, tmp_path):
    from omegaconf import OmegaConf

    from shakespeare.cli.train import fit, hyperparameters
    from tests.harness import compose_train

    assert OmegaConf.select(compose_train(tmp_path, ["seed=7"]), "hydra.run.dir").endswith("_block_norm_dropout_seed-7")
    assert not OmegaConf.select(compose_train(tmp_path, []), "hydra.run.dir").endswith(
        "seed-1337"
    )  # the default: unsaid
    cfg = tiny_cfg("seed=7")
    assert hyperparameters(cfg)["seed"] == 7  # TensorBoard's HParams tab
    fit(cfg)
    assert "seed=7)" in (Path(cfg.paths.output_dir) / "research_log.md").read_text()


def test_the_report_samples_one_run_of_each_configuration(monkeypatch):
    import shakespeare.report.samples as samples
    from shakespeare.report.runs import Run

    sampled = []
    monkeypatch.setattr(Run, "checkpoint", lambda self: self.path / "best.ckpt")
    monkeypatch.setattr(samples, "sample_run", lambda run, prompt, seed, length: sampled.append(run.name) or "text")
    runs = [scripted("rope", s, 1.7) for s in (1, 2, 3)] + [scripted("relu2", s, 1.6) for s in (1, 2, 3)]
    section = samples.samples_section(runs, length=4)
    assert sampled == ["rope-1", "relu2-1"] and section.count("### ") == 2  # another seed writes nothing new


def test_a_seeded_budget_sweep_is_a_row_a_configuration_with_its_interval_and_paired_gain():
    from shakespeare.report.runs import Run
    from shakespeare.report.tables import budget_table

    def budgeted(rung: str, seed: int, loss: float, steps: int) -> Run:
        run = scripted(rung, seed, loss, final=loss)
        run.config["trainer"] = {"max_time": "00:00:02:00", "max_epochs": -1}
        run.scalars["val/loss"] = [(steps // 2 - 1, 0.0, loss + 0.2), (steps - 1, 0.0, loss)]  # as Lightning logs
        return run

    runs = [budgeted("rope", s, 1.70 + s / 100, 900 + s) for s in (1, 2, 3)]
    runs += [budgeted("relu2", s, 1.60 + s / 100, 850) for s in (1, 2, 3)]
    labels = [f"{run.rung} seed={run.config['seed']}" for run in runs]
    rows = budget_table(runs, labels).splitlines()[2:]
    assert rows[0].startswith("| rope | 3 | 120 s | 901-903 | 1.7200 ± 0.0100 [") and rows[0].endswith("| - | - | - |")
    assert rows[1].startswith("| relu2 | 3 | 120 s | 850 | 1.6200 ± 0.0100 [")
    assert rows[1].endswith("| +0.1000 [+0.1000, +0.1000] | 0 | yes |")
    alone = budget_table(runs[:1] + runs[3:4], ["rope", "relu2"]).splitlines()[2:]
    assert alone == ["| rope | 120 s | 901 | 1.7100 | - |", "| relu2 | 120 s | 850 | 1.6100 | +0.1000 |"]  # as before
