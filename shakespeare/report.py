"""`python -m shakespeare.report FOLDER`: one markdown table and a validation-curve plot over every run in a folder.

Runs are read from what every run folder has, its TensorBoard events and `.hydra/` record, so the report
works on sweeps, on single runs and on runs that crashed part way (listed as such).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from shakespeare.callbacks import ELAPSED, TOKENS_PER_SECOND
from shakespeare.composition import CONFIG_DIR
from shakespeare.config import LADDER
from shakespeare.errors import UsageError
from shakespeare.run_folder import unescaped
from shakespeare.sweep import FAILURE
from shakespeare.inspection import LOSS_BY_POSITION, plot_loss_by_position
from shakespeare.tokenizer import printable

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
EVENTS = "events.out.tfevents.*"
ATTENTION = "inspection/attention"  # the attention grid the Inspection callback logs after every validation


@dataclass
class Run:
    """One run folder: its config, its scalars per TensorBoard tag, and what the table says about it."""

    path: Path
    name: str  # the folder, relative to the folder the report is over
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # tag -> (step, wall time, value)
    started: float | None = None  # wall time of the first event
    parameters: int | None = None
    logged_status: str | None = None  # from research_log.md, when the run wrote one
    problem: str | None = None

    @property
    def rung(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    def curve(self, tag: str) -> list[float]:
        """The values of `tag` in logging order: one per epoch for epoch-level tags like `val/loss`."""
        return [value for _, _, value in self.scalars.get(tag, [])]

    @property
    def loss_by_position(self) -> list[float]:
        """Validation loss at positions 1..T of the window, from the epoch with the best validation loss."""
        tags = sorted(tag for tag in self.scalars if tag.startswith(LOSS_BY_POSITION + "/"))
        val = self.scalars.get("val/loss")
        if not tags:
            return []
        best_step = min(val, key=lambda event: event[2])[0] if val else None
        values = []
        for tag in tags:
            at_best = [value for step, _, value in self.scalars[tag] if step == best_step]
            values.append(at_best[-1] if at_best else self.scalars[tag][-1][2])
        return values

    def attention_grid(self) -> bytes | None:
        """The last attention grid the run logged (PNG bytes), if it logged any."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        if self.problem or not any(self.path.glob(EVENTS)):
            return None
        events = EventAccumulator(str(self.path), size_guidance={"images": 1})  # the reservoir keeps the last
        try:
            events.Reload()
        except Exception:  # events cut short by a crash: no picture, as for a run that logged none
            return None
        return events.Images(ATTENTION)[-1].encoded_image_string if ATTENTION in events.Tags()["images"] else None

    def checkpoint(self) -> Path | None:
        """The checkpoint the run's sample is written with: its best, else its last."""
        return next((c for c in (self.path / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")) if c.is_file()), None)

    @property
    def time_budget(self) -> float | None:
        """trainer.max_time in seconds, None for a run without one."""
        from shakespeare.config import time_budget

        try:
            return time_budget(self.config.get("trainer", {}).get("max_time"))
        except UsageError:
            return None

    @property
    def trainer(self) -> dict:
        return self.config.get("trainer", {})

    @property
    def by_epoch(self) -> bool:
        """Whether the run counts epochs and validates at their ends (the log's runs), not every so many steps."""
        trainer = self.trainer
        return (trainer.get("max_epochs") not in (None, -1) and trainer.get("val_check_interval") in (None, 1.0)
                and trainer.get("check_val_every_n_epoch") is not None)

    @property
    def epochs(self) -> int:
        return len(self.scalars.get("val/loss", []))

    @property
    def steps(self) -> int | None:
        val = self.scalars.get("val/loss")
        return val[-1][0] if val else None

    @property
    def trained(self) -> str:
        """How far the run went, against what ends it: `10/10` epochs, `2,000/2,000 steps`, `6,400 steps in 580 s`."""
        if self.by_epoch:
            return f"{self.epochs}/{self.max_epochs or '?'}"
        steps, max_steps = self.steps, self.trainer.get("max_steps")
        text = "-" if steps is None else f"{steps:,}" + (f"/{max_steps:,}" if max_steps not in (None, -1) else "") + " steps"
        return text + (f" in {self.time_budget:.0f} s" if self.time_budget is not None else "")

    @property
    def max_epochs(self) -> int | None:
        return self.config.get("trainer", {}).get("max_epochs")

    @property
    def best_val_loss(self) -> float | None:
        values = self.curve("val/loss")
        return min(values) if values else None

    @property
    def corpus(self) -> str:
        """The data config's corpus file (`data=enwik8`: enwik8): the research log's losses are tinyshakespeare's."""
        return str(self.config.get("data", {}).get("file") or "tinyshakespeare.txt")

    @property
    def test_loss(self) -> float | None:
        """The loss of best.ckpt on the test split (`data.test_fraction`), when the run tested."""
        values = self.curve("test/loss")
        return values[-1] if values else None

    @property
    def seconds_per_epoch(self) -> float | None:
        """Training time per epoch, by the run's own clock (a resumed run's gap between sessions left out); runs
        from before it logged one: the wall time since the first event."""
        val = self.scalars.get("val/loss")
        if not val or not self.by_epoch:
            return None
        elapsed = self.curve(ELAPSED)
        if elapsed:
            return elapsed[-1] / len(val)
        return None if self.started is None else (val[-1][1] - self.started) / len(val)

    @property
    def tokens_per_second(self) -> tuple[float | None, bool]:
        """(tokens/s, measured): measured by the run, or estimated as steps x batch x sequence / wall time."""
        measured = self.curve(TOKENS_PER_SECOND)
        if measured:
            return sum(measured) / len(measured), True
        val, data = self.scalars.get("val/loss"), self.config.get("data", {})
        if not val or self.started is None or not isinstance(data.get("batch_size"), int):
            return None, False
        steps, seconds = val[-1][0], val[-1][1] - self.started
        return steps * data["batch_size"] * data.get("sequence_length", 1) / max(seconds, 1e-9), False

    @property
    def status(self) -> str:
        if self.problem:
            return f"failed ({self.problem})"
        if self.logged_status and self.logged_status != "running":
            return self.logged_status
        if self.epochs == 0:
            return "failed (no epoch finished)"
        if self.by_epoch and self.epochs < self.max_epochs:
            crashed = "killed or still running" if self.logged_status == "running" else "stopped early or partial"
            return f"{crashed} ({self.epochs}/{self.max_epochs} epochs)"
        return "finished"


def find_run_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) with TensorBoard events or a `.hydra/config.yaml` in it."""
    folders = {p.parent for p in root.rglob(EVENTS)} | {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    return sorted(folders)


def load_scalars(path: Path) -> tuple[dict[str, list[tuple[int, float, float]]], float | None]:
    """All scalars of the event files directly in `path`, and the wall time the first file was opened."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(path.glob(EVENTS)):
        return {}, None
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.FirstEventTimestamp()


def count_parameters(path: Path) -> int | None:
    """Parameters in the run's last (or best) checkpoint; the research log's count if there is none."""
    import torch

    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = path / "checkpoints" / name
        if checkpoint.is_file():
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
                return sum(tensor.numel() for name, tensor in state.items() if name.startswith("model."))
            except Exception:  # a checkpoint cut short by a crash: try the next source
                continue
    log = path / "research_log.md"
    match = re.search(r"^Parameters: ([\d,]+)", log.read_text(encoding="utf-8"), re.M) if log.is_file() else None
    return int(match.group(1).replace(",", "")) if match else None


def load_run(path: Path, root: Path) -> Run:
    """Read one run folder; whatever is missing or unreadable becomes the run's `problem`, never an exception."""
    run = Run(path=path, name=str(path.relative_to(root)) if path != root else path.name)
    hydra_dir = path / ".hydra"
    try:
        if (hydra_dir / "config.yaml").is_file():
            run.config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
        if (hydra_dir / "overrides.yaml").is_file():
            run.overrides = shown_overrides(hydra_dir, run.rung)
    except Exception as err:
        run.problem = f"unreadable .hydra/: {type(err).__name__}"
    try:
        run.scalars, run.started = load_scalars(path)
    except Exception as err:
        run.problem = f"unreadable events: {type(err).__name__}"
    log = path / "research_log.md"
    if log.is_file():
        match = re.search(r"^Status: (.+)$", log.read_text(encoding="utf-8"), re.M)
        run.logged_status = match.group(1).strip() if match else None
    failure = path / FAILURE  # a sweep job that failed says why
    if failure.is_file() and not run.problem:
        run.problem = failure.read_text(encoding="utf-8").strip().split(". ")[0]
    run.parameters = count_parameters(path)
    return run


def shown_overrides(hydra_dir: Path, rung: str) -> list[str]:
    """The command-line overrides that change results: not those the run's Hydra config keeps out of job names."""
    overrides = [unescaped(str(o)) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    excluded: list[str] = []
    if (hydra_dir / "hydra.yaml").is_file():
        hydra = OmegaConf.load(hydra_dir / "hydra.yaml")
        excluded = list(OmegaConf.select(hydra, "hydra.job.config.override_dirname.exclude_keys", default=[]) or [])
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in excluded and o != f"model={rung}"]


def load_runs(folder: str | Path) -> list[Run]:
    """Every run under `folder`, in ladder order (then by name). Raises UsageError if there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"{str(root)!r} is not a folder. Pass a folder of runs, e.g. outputs/ or outputs/multiruns/<date>/<time>.")
    folders = find_run_folders(root)
    if not folders:
        raise UsageError(
            f"No runs under {str(root)!r}: a run folder holds TensorBoard event files ({EVENTS}) or a "
            ".hydra/config.yaml. Train some first, e.g. `python train.py -m experiment=ladder`, and pass "
            "the folder it wrote (outputs/, or outputs/multiruns/<date>/<time> for one sweep)."
        )
    runs = [load_run(path, root) for path in folders]
    order = {rung: i for i, rung in enumerate(LADDER)}
    return sorted(runs, key=lambda run: (order.get(run.rung, len(LADDER)), run.name))


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def bits(loss: float | None) -> float | None:
    """A loss in nats as bits per character (per byte for byte-level runs): the unit the literature reports."""
    return None if loss is None else loss / math.log(2)


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
        cfg = compose("train", ["experiment=scale_up"] if rung == "scale_up" else ["experiment=ladder", f"model={rung}"])
    return defining(OmegaConf.to_container(cfg, resolve=False))


def defining(config: dict) -> dict:
    """The settings a loss in the research log depends on (fused attention computes the same model)."""
    model = {k: v for k, v in config.get("model", {}).items() if k not in ("fused_attention", "compile")}
    data, optimizer = config.get("data", {}), config.get("optimizer", {})
    return {"model": model, "data": {k: data.get(k) for k in ("sequence_length", "batch_size")},
            "optimizer": {k: optimizer.get(k) for k in ("_target_", "lr")},
            "max_epochs": config.get("trainer", {}).get("max_epochs")}


def matches_the_log(run: Run) -> bool:
    """Whether the research log's eval loss for the run's rung belongs beside it: tinyshakespeare, the log's settings."""
    settings = log_settings(run.rung)
    return settings is not None and run.corpus == "tinyshakespeare.txt" and defining(run.config) == settings


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
            _number(bits(run.best_val_loss)),
            *([_number(run.test_loss), _number(bits(run.test_loss))] if tested else []),
            _number(run.seconds_per_epoch, 2),
            "-" if tokens is None else ("" if measured else "≈") + f"{tokens:,.0f}",
            run.status,
            run.name,
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    notes = ["", "log's eval loss: the research log's, for runs of its rungs at its settings on tinyshakespeare, measured on "
             "its random_windows split (see README). bpc: bits per character (per byte for data.unit=byte), the loss / ln 2."]
    if tested:
        notes.append("test loss: best.ckpt on the text's last data.test_fraction, after the validation split.")
    if estimated:
        notes.append("≈: estimated as steps × batch × sequence length over wall time (validation included).")
    return "\n".join(rows + notes) + "\n"


def budget_table(runs: list[Run]) -> str:
    """The runs trained for a time budget (trainer.max_time), in ladder order: each one's validation loss when
    its time was up and what it gained over the run above it (`python train.py -m experiment=modern_ladder`)."""
    rows = ["| rung | time budget | steps | val loss at the budget | gain over the rung above |", "|---|---:|---:|---:|---:|"]
    before = None
    for run in (run for run in runs if run.time_budget is not None):
        final = run.scalars.get("val/loss", [])[-1:] or [(None, None, None)]
        step, _, loss = final[0]
        gain = before - loss if before is not None and loss is not None else None
        cells = [run.rung, f"{run.time_budget:.0f} s", "-" if step is None else f"{step:,}", _number(loss),
                 "-" if gain is None else f"{gain:+.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
        before = loss if loss is not None else before
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def labels(runs: list[Run]) -> list[str]:
    """Short names for plot legends: the rung and the overrides that differ between the runs; runs that would
    still share a name (a sweep over data.path, repeats) add their folder's."""
    common = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    names = [" ".join([run.rung, *(o for o in run.overrides if o not in common)]) for run in runs]
    return [f"{name} ({run.name})" if names.count(name) > 1 else name for name, run in zip(names, runs)]


def validation_curves(runs: list[Run]) -> tuple[str, list[tuple[str, list[int], list[float]]]]:
    """Each run's validation losses against the epoch, or against the training step once any run validates
    every so many steps (a time or step budget): the x axis's name, and (label, x, y) per run that has any."""
    axis = "epoch" if all(run.by_epoch for run in runs) else "step"
    points = []
    for run, label in zip(runs, labels(runs)):
        events = run.scalars.get("val/loss", [])
        if events:
            x = [step for step, _, _ in events] if axis == "step" else list(range(len(events)))
            points.append((label, x, [value for _, _, value in events]))
    return axis, points


def plot_validation_curves(runs: list[Run], path: Path) -> Path:
    """A PNG of validation loss per epoch, one line per run; beside it, when the runs logged it, the
    validation loss by position in the window (from each run's best epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    curves = [(label, run.loss_by_position) for run, label in zip(runs, labels(runs)) if run.loss_by_position]
    if curves:
        fig, (ax, by_position) = plt.subplots(1, 2, figsize=(15, 5.5))
        plot_loss_by_position(by_position, curves)
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5))
    axis, points = validation_curves(runs)
    for label, x, y in points:
        ax.plot(x, y, marker="o", markersize=3, label=label)
    title = "Validation loss by training step" if axis == "step" else "Validation loss per epoch"
    ax.set(xlabel=axis, ylabel="eval loss", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_run(run: Run, prompt: str, seed: int, length: int) -> str:
    """The run's continuation of `prompt`: its best checkpoint, seeded with `seed` (characters the model
    never saw are left out of the prompt)."""
    import torch

    from shakespeare.loading import load_generator
    from shakespeare.sampling import sample

    model, tokenizer = load_generator(run.checkpoint())
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a chain of small calls: one thread is fastest, and 2+ stall beside any busy process
    try:
        return sample(model, tokenizer, prompt, max_new_tokens=length, generator=generator, on_unknown="skip")[0]
    finally:
        torch.set_num_threads(threads)


def samples_section(runs: list[Run], prompt: str = "", seed: int = 0, length: int = 300) -> str:
    """Markdown: every run's sample from the same prompt and seed, in the table's (ladder) order."""
    shown = f"the prompt {prompt!r}" if prompt else "the empty prompt"
    text = f"## Samples\n\nEach run's best checkpoint continues {shown} with seed {seed} ({length} characters):\n"
    sampled = [run for run in runs if run.checkpoint() is not None]
    for run, label in zip(runs, labels(runs)):
        text += f"\n### {label} ({run.name})\n\n"
        if run.checkpoint() is None:
            text += "No checkpoint to sample from.\n"
            continue
        print(f"Sampling {sampled.index(run) + 1}/{len(sampled)}: {run.name}", file=sys.stderr, flush=True)
        try:
            written = printable(prompt + sample_run(run, prompt, seed, length))
        except UsageError as err:
            text += f"No sample: {err}\n"
            continue
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", written)), default=0))
        text += f"{fence}text\n{written}\n{fence}\n"
    return text


def write_figures(runs: list[Run], folder: Path) -> list[Path]:
    """`loss_by_position.png` over every run that logged it, and `attention.png`: the last attention grid of
    the highest rung that logged one. The README's pictures come from here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--figures {str(folder)!r} is a file; pass a folder to write the pictures into, e.g. docs.")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    curves = [(label, run.loss_by_position) for run, label in zip(runs, labels(runs)) if run.loss_by_position]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        plot_loss_by_position(ax, curves)
        fig.tight_layout()
        fig.savefig(folder / "loss_by_position.png", dpi=100)
        plt.close(fig)
        written.append(folder / "loss_by_position.png")
    grid = next((grid for run in reversed(runs) if (grid := run.attention_grid())), None)
    if grid:
        (folder / "attention.png").write_bytes(grid)
        written.append(folder / "attention.png")
    return written


def write_report(
    folder: str | Path, out: str | Path | None = None, prompt: str = "", seed: int = 0, sample_length: int = 300
) -> tuple[str, Path, Path]:
    """Write report.md (the table, the plot, every run's sample) and val_curves.png into `out` (default:
    `folder`); returns (table, report, plot). `sample_length=0` leaves the samples out."""
    runs = load_runs(folder)
    out = Path(out or folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    if budgets := budget_table(runs):
        table += f"\nThe same time budget each (trainer.max_time), losses on the whole held-out text:\n\n{budgets}"
    plot = plot_validation_curves(runs, out / "val_curves.png")
    samples = "\n" + samples_section(runs, prompt, seed, sample_length) if sample_length else ""
    report = out / "report.md"
    report.write_text(f"# Runs in {Path(folder).name}\n\n{table}\n![validation loss per epoch]({plot.name})\n{samples}", encoding="utf-8")
    return table, report, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shakespeare.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of runs: outputs/, a sweep's folder, or one run's folder")
    parser.add_argument("--out", help="where to write report.md and val_curves.png (default: the folder)")
    parser.add_argument("--prompt", default="", help="the prompt every run's sample continues (default: empty)")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed (default: 0)")
    parser.add_argument("--sample-length", type=int, default=300, help="characters per sample; 0: no samples")
    parser.add_argument("--figures", metavar="DIR", help="also write attention.png and loss_by_position.png into DIR")
    args = parser.parse_args(argv)
    if args.sample_length < 0:
        print(f"Error: --sample-length={args.sample_length} must be 0 (no samples) or more, e.g. 300.", file=sys.stderr)
        return 2
    prompt = args.prompt.replace("\\n", "\n")  # a typed \n is a line break, as in generate.py
    try:
        table, report, plot = write_report(args.folder, args.out, prompt, args.seed, args.sample_length)
        figures = write_figures(load_runs(args.folder), Path(args.figures)) if args.figures else []
    except UsageError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"Wrote {report} and {plot}")
    for figure in figures:
        print(f"Wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
