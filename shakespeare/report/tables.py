"""The report's tables: one row per run, and the time-budget table of the modern ladder."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from shakespeare.report.runs import Run
from shakespeare.report.seeds import Summary, configurations, gain, strip_seed
from shakespeare.run.composition import CONFIG_DIR

# Eval loss in the research log (its random_windows split; scale_up: the best of the 3 epochs it saw).
PUBLISHED = {
    "bigram": 2.4613,
    "head": 2.3073,
    "multihead": 2.0769,
    "multihead_ffn": 2.0320,
    "block": 2.0098,
    "block_norm": 1.9675,
    "block_norm_dropout": 2.0079,
    "scale_up": 1.7627,
}


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


@cache
def log_settings(rung: str) -> dict | None:
    """What defines a run of the research log's `rung` at the log's settings (experiment=ladder, or
    experiment=scale_up): the model, its context and batch, the optimizer and the epochs. None for other rungs."""
    if rung not in PUBLISHED:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", ["experiment=scale_up"] if rung == "scale_up" else ["experiment=ladder", f"model={rung}"]
        )
    return defining(OmegaConf.to_container(cfg, resolve=False))


def defining(config: dict) -> dict:
    """The settings a loss in the research log depends on (fused attention computes the same model)."""
    model = {k: v for k, v in config.get("model", {}).items() if k not in ("fused_attention", "compile")}
    data, optimizer = config.get("data", {}), config.get("optimizer", {})
    return {
        "model": model,
        "data": {k: data.get(k) for k in ("sequence_length", "batch_size")},
        "optimizer": {k: optimizer.get(k) for k in ("_target_", "lr")},
        "max_epochs": config.get("trainer", {}).get("max_epochs"),
    }


def matches_the_log(run: Run) -> bool:
    """Whether the research log's eval loss for the run's rung belongs beside it: tinyshakespeare, the log's settings."""
    if run.rung not in PUBLISHED or run.corpus != "tinyshakespeare.txt" or not near_the_log(run):
        return False
    return defining(run.config) == log_settings(run.rung)


@cache
def experiment_settings(name: str) -> dict:
    """What conf/experiment/<name>.yaml sets, read as plain data (no composition)."""
    return yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text(encoding="utf-8")) or {}


def near_the_log(run: Run) -> bool:
    """A quick look before composing the log's config: the context, batch and epochs its experiment file sets."""
    experiment = experiment_settings("scale_up" if run.rung == "scale_up" else "ladder")
    for group in ("data", "trainer"):
        for key, value in (experiment.get(group) or {}).items():
            if key in ("sequence_length", "batch_size", "max_epochs") and run.config.get(group, {}).get(key) != value:
                return False
    return True


def markdown_table(runs: list[Run]) -> str:
    """One row per run: rung, overrides, parameters, epochs, losses (and bits per character; test loss when
    a run has a test split), seconds/epoch, tokens/s, status, folder."""
    tested = any(run.test_loss is not None for run in runs)
    test_columns = " test loss | test bpc |" if tested else ""
    rows = [
        f"| rung | overrides | parameters | trained | best eval loss | log's eval loss | eval bpc |{test_columns} "
        "s/epoch | tokens/s | status | run |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|---:|" * tested + "---:|---:|---|---|",
    ]
    estimated = False
    for run in runs:
        tokens, measured = run.tokens_per_second
        estimated |= tokens is not None and not measured
        cells = [
            run.rung,
            " ".join(f"`{o}`" for o in run.overrides) or "-",
            "-" if run.parameters is None else f"{run.parameters:,}",
            run.trained,
            _number(run.best_val_loss),
            _number(PUBLISHED.get(run.rung) if matches_the_log(run) else None),
            _number(run.best_bpc),
            *([_number(run.test_loss), _number(run.test_bpc)] if tested else []),
            _number(run.seconds_per_epoch, 2),
            "-" if tokens is None else ("" if measured else "≈") + f"{tokens:,.0f}",
            run.status,
            run.name,
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    notes = [
        "",
        "log's eval loss: the research log's, for runs of its rungs at its settings on tinyshakespeare, measured on "
        "its random_windows split (see README). bpc: bits per character of the held-out text, whatever the run's "
        "tokens (its total nats / its characters / ln 2; for characters the loss / ln 2), so runs of every data.unit "
        "compare on it.",
    ]
    if tested:
        notes.append("test loss: best.ckpt on the text's last data.test_fraction, after the validation split.")
    if estimated:
        notes.append("≈: estimated as steps × batch × sequence length over wall time (validation included).")
    return "\n".join(rows + notes) + "\n"


def budget_table(runs: list[Run], labels: list[str] | None = None) -> str:
    """The runs trained for a time budget (trainer.max_time, or the equal-time mode's equal_time.budget), in ladder
    order: each one's steps, its validation loss when its time was up and what it gained over the row above
    (`python train.py -m experiment=modern_ladder`). Runs that differ only in their seed are one row: the mean ±
    standard deviation and interval over the seeds, and the gain paired over the seeds both rows ran, marked
    significant or not (`seed=1,2,3`)."""
    budgeted = [(run, label) for run, label in zip(runs, labels or [run.rung for run in runs]) if run.time_budget]
    groups = configurations([run for run, _ in budgeted], [strip_seed(label) for _, label in budgeted])
    if not groups:
        return ""
    seeded = any(len(group.runs) > 1 for group in groups)
    rows = (
        [
            "| configuration | seeds | time budget | steps | val loss at the budget | gain over the row above | p | "
            "significant |",
            "|---|---:|---:|---:|---|---|---:|---|",
        ]
        if seeded
        else [
            "| rung | time budget | steps | val loss at the budget | gain over the rung above |",
            "|---|---:|---:|---:|---:|",
        ]
    )
    if not seeded:  # one run a row, each against the run above
        before = None
        for run, _ in budgeted:
            final = run.curve("val/loss")[-1:] or [None]
            gain_shown = "-" if before is None or final[0] is None else f"{before - final[0]:+.4f}"
            steps = "-" if run.steps is None else f"{run.steps:,}"
            rows.append(f"| {run.rung} | {run.time_budget:.0f} s | {steps} | {_number(final[0])} | {gain_shown} |")
            before = final[0] if final[0] is not None else before
        return "\n".join(rows) + "\n"
    for before, group in zip([None, *groups], groups):
        runs_of = list(group.runs.values())
        steps = sorted({run.steps for run in runs_of if run.steps is not None})
        steps_shown = "-" if not steps else f"{steps[0]:,}" + (f"-{steps[-1]:,}" if len(steps) > 1 else "")
        found = gain(before, group, "final") if before is not None and before.data == group.data else None
        p = "-" if found is None or found.p is None else f"{found.p:.3g}"
        cells = [group.label, str(len(runs_of)), f"{runs_of[0].time_budget:.0f} s", steps_shown]
        cells += [Summary.of(list(group.final().values())).shown()]
        cells += ["-", "-", "-"] if found is None else [found.shown(), p, found.mark]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def unit_order(tokens: str) -> tuple[int, int]:
    """char, byte, then BPEs by size."""
    unit, _, size = tokens.partition(" ")
    return ({"char": 0, "byte": 1}.get(unit, 2), int(size) if size.isdigit() else 0)


def units_table(runs: list[Run]) -> str:
    """The time-budget runs compared by their tokens (`python train.py -m experiment=tokenizer_ladder`), when they
    differ: each one's bits per character of the held-out text when its time was up, how far behind the best it
    ended, and which tokens win at equal time, and by how much. Empty when the runs share their tokens."""
    timed = sorted(
        (run for run in runs if run.time_budget is not None and run.final_bpc is not None),
        key=lambda run: unit_order(run.tokens),
    )
    if len({run.tokens for run in timed}) < 2:
        return ""
    best = min(run.final_bpc for run in timed)
    rows = [
        "| tokens | time budget | steps | val loss at the budget (nats/token) | val bpc at the budget "
        "| behind the best |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in timed:
        step = run.steps
        behind = run.final_bpc - best
        cells = [
            run.tokens,
            f"{run.time_budget:.0f} s",
            "-" if step is None else f"{step:,}",
            _number(run.curve("val/loss")[-1]),
            _number(run.final_bpc),
            "best" if behind == 0 else f"+{behind:.4f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + units_verdict(timed) + "\n"


def units_verdict(timed: list[Run]) -> str:
    """`At equal time (120 s each), bpe 512 wins: 1.6012 bits per character, 0.0211 below char (1.6223), the
    runner-up ...`: which tokens win, and by how much in bits per character."""
    ranked = sorted(timed, key=lambda run: run.final_bpc)
    winner, second = ranked[0], ranked[1]
    budgets = {round(run.time_budget) for run in timed}
    when = f"At equal time ({budgets.pop()} s each)" if len(budgets) == 1 else "At the runs' time budgets (they differ)"
    text = (
        f"{when}, **{winner.tokens}** wins: {winner.final_bpc:.4f} bits per character of the held-out text, "
        f"{second.final_bpc - winner.final_bpc:.4f} below {second.tokens} ({second.final_bpc:.4f}), the runner-up"
    )
    chars = next((run for run in ranked[2:] if run.tokens == "char"), None)
    if chars is not None:
        text += f", and {chars.final_bpc - winner.final_bpc:.4f} below char ({chars.final_bpc:.4f})"
    return text + "."
