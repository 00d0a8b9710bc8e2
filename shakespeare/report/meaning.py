"""What the runs' losses mean: each held-out text's code length by the standard compressors, and where each run
stands among them, statically and (when evaluate.py measured it) adaptively."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from statistics import mean

from omegaconf import OmegaConf

from shakespeare.data.text import SplitText
from shakespeare.data.yardsticks import yardsticks
from shakespeare.errors import UsageError
from shakespeare.report.runs import Run
from shakespeare.report.seeds import configurations, strip_seed

EVALUATION = "evaluation.json"  # what evaluate.py recorded in a run folder


@dataclass
class HeldOut:
    """One held-out text (a corpus and split, whatever the runs' units) the runs share, and its compressors' code
    lengths."""

    name: str
    unit: str
    runs: list[Run] = field(default_factory=list)
    compressors: dict[str, float] = field(default_factory=dict)  # name -> nats per character
    problem: str = ""


def data_settings(run: Run) -> dict | None:
    """The run's data module settings, resolved from its recorded config (None when it has none)."""
    data = run.config.get("data")
    if not isinstance(data, dict):
        return None
    recorded = {key: run.config.get(key) for key in ("data", "paths", "seed")}
    settings = resolved_data(json.dumps(recorded, sort_keys=True, default=str))
    return None if settings is None else dict(settings)


@cache
def resolved_data(recorded: str) -> dict | None:
    """`data` with its interpolations (`${paths.cache_dir}`) resolved; the runs of a sweep share one answer."""
    try:
        settings = OmegaConf.to_container(OmegaConf.create(json.loads(recorded)).data, resolve=True)
    except Exception:  # an interpolation this machine cannot resolve
        return None
    settings.pop("_target_", None)
    return settings


def held_out_texts(runs: list[Run]) -> list[HeldOut]:
    """The runs grouped by the held-out text they were scored on (char, byte and BPE runs cut the text at the same
    characters), each with its compressors' code lengths (measured once per text and kept beside its token caches;
    a text this machine cannot read gets a note instead)."""
    texts: dict[str, HeldOut] = {}
    for run in runs:
        settings = data_settings(run)
        if settings is None or run.best_val_loss is None:
            continue
        key = json.dumps(
            {k: settings.get(k) for k in ("path", "url", "sha256", "split", "val_fraction", "test_fraction")},
            sort_keys=True,
        )
        if key not in texts:
            texts[key] = measure(settings, run)
        texts[key].runs.append(run)
    return list(texts.values())


def measure(settings: dict, run: Run) -> HeldOut:
    source = settings.get("path") or settings.get("file") or "the corpus"
    name = f"{Path(source).name}, the validation split"
    text = HeldOut(name=name, unit="char")
    try:
        found = yardsticks(SplitText.of(settings), "val")
        text.compressors = {stick.compressor: stick.nats_per_char for stick in found}
        if not text.compressors:
            text.problem = (
                "its validation windows overlap the training ones (data.split=random_windows): no held-out text"
            )
    except UsageError as err:
        text.problem = f"its text cannot be read here ({str(err).split('. ')[0]})"
    return text


def evaluated(run: Run) -> dict:
    """evaluate.py's record of the run's validation text, if there is one."""
    try:
        return json.loads((run.path / EVALUATION).read_text(encoding="utf-8")).get("val") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def standing(nats: float, compressors: dict[str, float]) -> str:
    """`better than xz -9e, worse than PPMd -o6 -m256`: the nearest compressor on each side."""
    above = [(theirs, name) for name, theirs in compressors.items() if theirs > nats]
    below = [(theirs, name) for name, theirs in compressors.items() if theirs <= nats]
    parts = [f"better than {min(above)[1]}" if above else "", f"worse than {max(below)[1]}" if below else ""]
    return ", ".join(part for part in parts if part) or "-"


def meaning_section(runs: list[Run], labels: list[str]) -> str:
    """Markdown: for each held-out text, every compressor and every run on one scale, best last."""
    sections = []
    label_of = {id(run): label for run, label in zip(runs, labels)}
    for text in held_out_texts(runs):
        if text.problem:
            sections.append(f"### {text.name}\n\nNo compressor yardsticks: {text.problem}.\n")
            continue
        rows = [(nats, f"{name} (given the training text)", "-") for name, nats in text.compressors.items()]
        for group in configurations(text.runs, [strip_seed(label_of[id(run)]) for run in text.runs]):
            runs = list(group.runs.values())
            label = label_of[id(runs[0])] if len(runs) == 1 else f"{group.label} ({len(runs)} seeds, mean)"
            static = mean([run.best_bpc * math.log(2) for run in runs])  # per character, whatever the tokens
            rows.append((static, f"{label}: best eval loss", standing(static, text.compressors)))
            adaptive = [record["prequential"] for run in runs if (record := evaluated(run)).get("prequential")]
            if adaptive:
                nats = mean(adaptive)
                what = f"{label}: adaptive, prequential (evaluate.py" + (
                    f", {len(adaptive)} of its seeds)" if len(runs) > 1 and len(adaptive) < len(runs) else ")"
                )
                rows.append((nats, what, standing(nats, text.compressors)))
        unit = text.unit
        lines = [f"### {text.name}", "", f"| | nats/{unit} | bits/{unit} | stands |", "|---|---:|---:|---|"]
        for nats, what, where in sorted(rows, key=lambda row: -row[0]):
            lines.append(f"| {what} | {nats:.4f} | {nats / math.log(2):.4f} | {where} |")
        sections.append("\n".join(lines) + "\n")
    if not sections:
        return ""
    return (
        "## What the losses mean\n\nEach held-out text's code length by the standard compressors, given the training "
        "text, on the same scale as the runs' losses (the adaptive figures learn as they read, as PPMd does):\n\n"
        + "\n".join(sections)
    )
