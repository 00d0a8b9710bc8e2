"""The evaluate command: a trained model's code length of its run's held-out text, every character once, beside the
compressors' code length of the same text; with adapt=true also its adaptive (prequential) code length. The
figures go to the terminal and into the run folder (evaluation.json, research_log.md, TensorBoard)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import hydra
from omegaconf import DictConfig, OmegaConf

from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.data.yardsticks import held_out_range, yardsticks
from shakespeare.errors import UsageError, explained_exit
from shakespeare.evaluation.scoring import Adaptation, adaptive_code_length, static_code_length
from shakespeare.model.loading import load_generator, load_verified, resolve_checkpoint
from shakespeare.ranges import ranges_of
from shakespeare.run.composition import CONFIG_DIR, explained_composition
from shakespeare.run.folders import checkpoint_of, shown
from shakespeare.run.host import check_device, flush_denormals, set_threads
from shakespeare.run.schema import check_types, parameters
from shakespeare.training.lines import EVALUATION

log = logging.getLogger("shakespeare")

# conf/evaluate.yaml's keys, their types and ranges; the adaptation node is typed by Adaptation's parameters
SETTINGS = {
    "ckpt_path": str | None,
    "log_dir": str,
    "split": Literal["val", "test"],
    "data_path": str | None,
    "adapt": bool,
    "record": bool,
    "threads": parameters(set_threads).types["threads"],
    "device": str,
}
RANGES = {"threads": ranges_of(set_threads)["threads"][0]}
BUILDERS = {"adaptation": Adaptation}
SPLITS = {"val": "validation", "test": "test"}
RECORD = "evaluation.json"  # in the run folder: each split's latest figures, rendered into research_log.md


@dataclass
class Evaluation:
    """One evaluation of a checkpoint on a held-out split, as it is shown and recorded."""

    checkpoint: str
    step: int
    split: str
    characters: int
    static: float  # nats/char
    prequential: float | None  # nats/char of the adaptive evaluation, when there was one
    adaptation: dict | None
    yardsticks: dict[str, float]  # compressor -> nats/char of the same text given the training text
    seconds: float
    date: str


def evaluate_checkpoint(cfg: DictConfig, out: TextIO = sys.stdout) -> Evaluation:
    """Score `cfg.ckpt_path` on its run's held-out `cfg.split` as `cfg` describes, print it, and record it."""
    check_types(cfg, SETTINGS, RANGES, BUILDERS)
    adaptation = Adaptation(**OmegaConf.to_container(cfg.adaptation)) if cfg.adapt else None
    if not cfg.ckpt_path:
        raise UsageError(
            "ckpt_path is not set. Pass the run to evaluate: a run folder, a .ckpt, or last (the newest run)."
        )
    set_threads(cfg.threads)
    flush_denormals()
    device = check_device(cfg.device)
    path = resolve_checkpoint(checkpoint_of(cfg.ckpt_path, cfg.log_dir))
    model, tokenizer = load_generator(path, map_location=device)
    checkpoint = load_verified(path)
    datamodule = run_data(checkpoint, path, cfg.data_path)
    if datamodule.tokenizer.vocabulary != tokenizer.vocabulary:
        raise UsageError(
            f"The text {path} was trained on is tokenized here into {len(datamodule.tokenizer)} tokens, not the "
            f"{len(tokenizer)} of its checkpoint, so it is not that text (or its token cache was made by another "
            "tokenizer). Pass the run's own text with data_path=/path/to/text."
        )
    span = held_out_range(datamodule.text, cfg.split)
    if span is None:
        raise UsageError(
            f"{path} was trained on data.split=random_windows, whose validation windows overlap its training "
            "windows: there is no held-out text to read once. Evaluate a run trained on the contiguous split (the "
            "default), or its test split (split=test, for a run with data.test_fraction)."
        )
    _, start, stop = span
    ids = datamodule.cache.ids(0, stop).to(device)
    began = time.perf_counter()
    counts = tokenizer.characters  # characters per id: every figure is per character of the text, whatever the unit
    static = static_code_length(model, ids, start, characters=counts)
    adaptive = adaptive_code_length(model, ids, start, adaptation, characters=counts) if adaptation else None
    seconds = time.perf_counter() - began
    evaluation = Evaluation(
        checkpoint=shown(path),
        step=int(checkpoint.get("global_step", 0)),
        split=cfg.split,
        characters=static.characters,
        static=static.nats_per_char,
        prequential=adaptive.nats_per_char if adaptive else None,
        adaptation=asdict(adaptation) if adaptation else None,
        yardsticks={stick.compressor: stick.nats_per_char for stick in yardsticks(datamodule.text, cfg.split)},
        seconds=seconds,
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    out.write(table(evaluation, datamodule))
    if cfg.record:
        out.write(record(evaluation, path))
    return evaluation


def run_data(checkpoint: dict[str, Any], path: Path, data_path: str | None) -> ShakespeareDataModule:
    """The run's data module, rebuilt from the checkpoint's record of it (with `data_path` for a text that moved)."""
    settings = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not settings:
        raise UsageError(
            f"{path} holds no record of the text it was trained on, so there is no held-out text to score."
        )
    if data_path:
        settings["path"] = data_path
    try:
        datamodule = ShakespeareDataModule(**settings)
        datamodule.setup()
    except UsageError as err:
        raise UsageError(
            f"The text {path} was trained on cannot be read here: {err} Pass its copy with data_path=/path/to/text."
        ) from None
    return datamodule


def scored_lines(evaluation: Evaluation) -> list[tuple[str, float]]:
    """(what, nats/char) of the model and the compressors, as the table lists them."""
    lines = [("this model, static (each character once)", evaluation.static)]
    if evaluation.prequential is not None:
        lines.append(("this model, adaptive (prequential: learns as it reads)", evaluation.prequential))
    return lines + [(f"{name} (given the training text)", nats) for name, nats in evaluation.yardsticks.items()]


def verdict(name: str, nats: float, yardsticks: dict[str, float]) -> str:
    """`static: better than gzip -9, bzip2 -9; worse than PPMd -o6 -m256`."""
    better = [compressor for compressor, theirs in yardsticks.items() if nats < theirs]
    worse = [compressor for compressor, theirs in yardsticks.items() if nats >= theirs]
    parts = [f"better than {', '.join(better)}" if better else "", f"worse than {', '.join(worse)}" if worse else ""]
    return f"{name}: " + "; ".join(part for part in parts if part)


def table(evaluation: Evaluation, datamodule: ShakespeareDataModule) -> str:
    """What the terminal shows: the text, every figure in nats and bits per character, and where the model stands."""
    hp, unit = datamodule.hparams, "char"
    source = hp.path or hp.file or hp.url
    tokens = "" if hp.unit == "char" else f" in {hp.unit} tokens"
    text = (
        f"The {SPLITS[evaluation.split]} text of {source}: {evaluation.characters:,} characters{tokens} "
        f"({evaluation.checkpoint}, step {evaluation.step:,})\n"
    )
    text += f"  {'':56} {'nats/' + unit:>10} {'bits/' + unit:>10}\n"
    for what, nats in scored_lines(evaluation):
        text += f"  {what:56} {nats:10.4f} {nats / 0.6931471805599453:10.4f}\n"
    if evaluation.yardsticks:
        text += "  " + verdict("static", evaluation.static, evaluation.yardsticks) + "\n"
        if evaluation.prequential is not None:
            text += "  " + verdict("adaptive", evaluation.prequential, evaluation.yardsticks) + "\n"
    if evaluation.adaptation:
        settings = ", ".join(f"{key}={value}" for key, value in evaluation.adaptation.items())
        text += f"  adaptive: dynamic evaluation with {settings}\n"
    return text + f"  ({evaluation.seconds:.1f} s of scoring)\n"


def record(evaluation: Evaluation, path: Path) -> str:
    """Keep the figures in the run folder: evaluation.json (each split's latest), the Evaluation section of
    research_log.md, and TensorBoard scalars `evaluate/<split>/static` and `evaluate/<split>/prequential`."""
    if path.parent.name != "checkpoints":
        return f"  (not recorded: {path} is not in a run folder's checkpoints/)\n"
    run = path.parent.parent
    kept = read_record(run)
    kept[evaluation.split] = asdict(evaluation)
    partial = run / (RECORD + ".part")
    partial.write_text(json.dumps(kept, indent=1), encoding="utf-8")
    os.replace(partial, run / RECORD)
    write_research_log_section(run, kept)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run)) as writer:
        writer.add_scalar(f"evaluate/{evaluation.split}/static", evaluation.static, evaluation.step)
        if evaluation.prequential is not None:
            writer.add_scalar(f"evaluate/{evaluation.split}/prequential", evaluation.prequential, evaluation.step)
    return f"  Recorded in {shown(run / RECORD)}, research_log.md and the run's TensorBoard events.\n"


def read_record(run: Path) -> dict[str, dict]:
    try:
        kept = json.loads((run / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def write_research_log_section(run: Path, kept: dict[str, dict]) -> None:
    """Replace research_log.md's Evaluation section with the recorded figures, one paragraph per split."""
    log_file = run / "research_log.md"
    if not log_file.is_file():
        return
    text = log_file.read_text(encoding="utf-8").split(EVALUATION)[0].rstrip("\n") + "\n" + EVALUATION
    for split, figures in sorted(kept.items()):
        evaluation = Evaluation(**figures)
        text += (
            f"\n{SPLITS[split].capitalize()} text, {evaluation.characters:,} characters ({evaluation.checkpoint}, "
            f"step {evaluation.step:,}; {evaluation.date}):\n\n"
        )
        for what, nats in scored_lines(evaluation):
            text += f"- {what}: {nats:.4f} nats/char ({nats / 0.6931471805599453:.4f} bits/char)\n"
    partial = log_file.with_name(log_file.name + ".part")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, log_file)


def evaluate() -> None:
    """`python evaluate.py`: a config Hydra cannot compose is one paragraph and exit 2; then `run`."""
    with explained_composition("evaluate", "evaluate.py"):
        run()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def run(cfg: DictConfig) -> None:
    """`python evaluate.py ckpt_path=... [adapt=true]`."""
    with explained_exit():
        evaluate_checkpoint(cfg)
