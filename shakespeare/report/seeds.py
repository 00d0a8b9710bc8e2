"""Runs that differ only in their seed: each configuration's mean, spread and confidence interval, and each rung's
gain over the rung before, paired over the seeds both were trained with, marked significant or not.

Welch would compare unpaired runs; runs of two rungs with the same seed share their initial draws of the data
order, so their difference is measured paired (Student's t on the per-seed differences), as speedrun
leaderboards ask (p < 0.01 over several seeds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from scipy.special import (  # Student's t: its CDF and quantile (scipy.stats takes most of a second to import)
    stdtr,
    stdtrit,
)

from shakespeare.report.runs import Run

LEVEL = 0.95  # the confidence of the intervals; a gain is significant when its interval leaves out 0 (p < 0.05)


@dataclass
class Summary:
    """n values' mean, standard deviation (n - 1) and LEVEL confidence interval (Student's t); one value: no spread."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        n, mean = len(values), sum(values) / len(values)
        if n < 2:
            return cls(n, mean, None, None, None)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = stdtrit(n - 1, (1 + LEVEL) / 2) * sd / math.sqrt(n)
        return cls(n, mean, sd, mean - half, mean + half)

    def shown(self) -> str:
        if self.sd is None:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.sd:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass
class Configuration:
    """The runs of one configuration, by seed."""

    label: str
    data: str  # the text and split it was scored on: only configurations on the same one are compared
    runs: dict[int, Run] = field(default_factory=dict)
    repeats: list[str] = field(default_factory=list)  # runs of a seed already counted

    def best(self) -> dict[int, float]:
        return {seed: run.best_val_loss for seed, run in self.runs.items() if run.best_val_loss is not None}

    def final(self) -> dict[int, float]:
        return {seed: values[-1] for seed, run in self.runs.items() if (values := run.curve("val/loss"))}


def configuration_key(run: Run) -> str:
    """What a run is apart from its seed (and where it was written)."""
    config = {key: value for key, value in run.config.items() if key not in ("seed", "paths", "ckpt_path")}
    return json.dumps(config, sort_keys=True, default=str)


def configurations(runs: list[Run], labels: list[str]) -> list[Configuration]:
    """The runs grouped by configuration, in the runs' (ladder) order; `labels` name them without their seeds."""
    found: dict[str, Configuration] = {}
    for run, label in zip(runs, labels):
        if run.problem or run.best_val_loss is None:
            continue
        key = configuration_key(run)
        data = json.dumps(
            {k: run.config.get("data", {}).get(k) for k in ("path", "file", "unit", "split", "val_fraction")}
        )
        group = found.setdefault(key, Configuration(label=label, data=data))
        seed = run.config.get("seed")
        if seed in group.runs:
            group.repeats.append(f"{run.name} (seed {seed}, as {group.runs[seed].name})")
        else:
            group.runs[seed] = run
    return list(found.values())


@dataclass
class Gain:
    """How much lower a configuration's best loss is than the one before it, paired over their shared seeds."""

    over: str
    seeds: int
    summary: Summary
    p: float | None

    @property
    def significant(self) -> bool | None:
        return None if self.p is None else self.p < 1 - LEVEL

    @property
    def mark(self) -> str:
        return {True: "yes", False: "no", None: "- (one seed)"}[self.significant]

    def shown(self) -> str:
        """`+0.0172 [+0.0081, +0.0263]`: the mean gain and its interval (one shared seed: the gain alone)."""
        summary = self.summary
        interval = "" if summary.sd is None else f" [{summary.low:+.4f}, {summary.high:+.4f}]"
        return f"{summary.mean:+.4f}{interval}"


def gain(before: Configuration, after: Configuration, metric: str = "best") -> Gain | None:
    """`before`'s best (or `metric="final"`: last) loss minus `after`'s, seed by seed over the seeds both have; None
    without a shared seed."""
    a, b = getattr(before, metric)(), getattr(after, metric)()
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    differences = [a[seed] - b[seed] for seed in shared]
    summary = Summary.of(differences)
    p = None
    if summary.sd is not None:
        p = (
            0.0
            if summary.sd == 0
            else float(stdtr(summary.n - 1, -abs(summary.mean) / (summary.sd / math.sqrt(summary.n))) * 2)
        )
    return Gain(over=before.label, seeds=len(shared), summary=summary, p=p)


def seeds_section(runs: list[Run], labels: list[str]) -> str:
    """Markdown, when some configuration was trained with several seeds: each configuration's spread, and each one's
    gain over the configuration before it on the same text. Empty when every configuration has one seed."""
    groups = configurations(runs, [strip_seed(label) for label in labels])
    if all(len(group.runs) < 2 for group in groups):
        return ""
    level = f"{LEVEL:.0%}"
    lines = [
        "## Seeds",
        "",
        f"Mean ± standard deviation [{level} confidence interval, Student's t] over the seeds of each configuration:",
        "",
        "| configuration | seeds | best eval loss | final eval loss |",
        "|---|---:|---|---|",
    ]
    for group in groups:
        seeds = ", ".join(str(seed) for seed in sorted(group.runs))
        best, final = Summary.of(list(group.best().values())), group.final()
        last = Summary.of(list(final.values())).shown() if final else "-"
        lines.append(f"| {group.label} | {len(group.runs)} ({seeds}) | {best.shown()} | {last} |")
    if len(groups) < 2:  # nothing to compare one configuration with
        return "\n".join(lines + repeated(groups)) + "\n"
    lines += [
        "",
        f"Each configuration's gain over the one before it on the same text (its best eval loss lower by), paired "
        f"over the seeds both ran; significant: the {level} interval leaves out 0 (p < {1 - LEVEL:.2f}, two-sided):",
        "",
        "| configuration | over | shared seeds | gain [interval] | p | significant |",
        "|---|---|---:|---|---:|---|",
    ]
    for before, after in zip(groups, groups[1:]):
        if before.data != after.data:
            lines.append(f"| {after.label} | {before.label} | - | not compared: another text or split | - | - |")
            continue
        found = gain(before, after)
        if found is None:
            lines.append(f"| {after.label} | {before.label} | 0 | no seed in common | - | - |")
            continue
        p = "-" if found.p is None else f"{found.p:.3g}"
        lines.append(f"| {after.label} | {before.label} | {found.seeds} | {found.shown()} | {p} | {found.mark} |")
    return "\n".join(lines + repeated(groups)) + "\n"


def repeated(groups: list[Configuration]) -> list[str]:
    """The note naming the runs that repeat a configuration's seed, if any."""
    repeats = [repeat for group in groups for repeat in group.repeats]
    if not repeats:
        return []
    return ["", "Counted once (the same configuration and seed as a run above): " + "; ".join(repeats) + "."]


def strip_seed(label: str) -> str:
    """A plot label without its `seed=N` override: the configuration's name."""
    return " ".join(part for part in label.split(" ") if not part.startswith("seed="))
