"""Reading run folders: each one's config, overrides, TensorBoard scalars and status, from what every run folder
has (its events and `.hydra/` record), so sweeps, single runs and runs that crashed part way all read alike."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shakespeare.errors import UsageError
from shakespeare.run.composition import LADDER
from shakespeare.run.folders import FAILURE, unescaped
from shakespeare.training.tags import ATTENTION, ELAPSED, LOSS_BY_POSITION, TOKENS_PER_SECOND

EVENTS = "events.out.tfevents.*"


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
        return next(
            (c for c in (self.path / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")) if c.is_file()), None
        )

    @property
    def time_budget(self) -> float | None:
        """The run's time budget in seconds: trainer.max_time, or the equal-time mode's; None without one."""
        if calibration := self.calibration:
            return calibration.get("budget_seconds")
        max_time = self.config.get("trainer", {}).get("max_time")
        if max_time is None:
            return None
        # read as Lightning's Timer reads it: Lightning's import (seconds) is paid by budget runs only
        from shakespeare.training.lines import budget_seconds

        try:
            return budget_seconds(max_time)
        except UsageError:
            return None

    @property
    def trainer(self) -> dict:
        return self.config.get("trainer", {})

    @property
    def by_epoch(self) -> bool:
        """Whether the run counts epochs and validates at their ends (the log's runs), not every so many steps."""
        trainer = self.trainer
        return (
            trainer.get("max_epochs") not in (None, -1)
            and trainer.get("val_check_interval") in (None, 1.0)
            and trainer.get("check_val_every_n_epoch") is not None
        )

    @property
    def epochs(self) -> int:
        return len(self.scalars.get("val/loss", []))

    @property
    def steps(self) -> int | None:
        """Training steps done at the last validation (Lightning logs a validation at its last step's index)."""
        val = self.scalars.get("val/loss")
        return steps_done(val[-1][0]) if val else None

    @property
    def calibration(self) -> dict:
        """The equal-time mode's calibration (run/calibration.py), when the run was trained in it."""
        try:
            return json.loads((self.path / "calibration.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @property
    def trained(self) -> str:
        """How far the run went, against what ends it: `10/10` epochs, `2,000/2,000 steps`, `6,400 steps in 580 s`."""
        if self.by_epoch:
            return f"{self.epochs}/{self.max_epochs or '?'}"
        steps, max_steps = self.steps, self.trainer.get("max_steps")
        if calibration := self.calibration:
            done = "-" if steps is None else f"{steps:,}"
            return f"{done}/{calibration['steps']:,} steps (equal time, {calibration['budget_seconds']:.0f} s)"
        text = (
            "-"
            if steps is None
            else f"{steps:,}" + (f"/{max_steps:,}" if max_steps not in (None, -1) else "") + " steps"
        )
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
    def best_bpc(self) -> float | None:
        """Bits per character of the held-out text at the best eval loss, whatever the run's unit: its `val/bpc` (a
        run from before that was per character logged the loss / ln 2, as the figure is for characters)."""
        val, bpc = self.scalars.get("val/loss"), self.scalars.get("val/bpc")
        if not val:
            return None
        if not bpc:
            return self.best_val_loss / math.log(2)
        best_step = min(val, key=lambda event: event[2])[0]
        at_best = [value for step, _, value in bpc if step == best_step]
        return at_best[-1] if at_best else min(value for _, _, value in bpc)

    @property
    def final_bpc(self) -> float | None:
        """Bits per character at the run's last validation (a time budget's end)."""
        values = self.curve("val/bpc")
        return values[-1] if values else None

    @property
    def test_bpc(self) -> float | None:
        """best.ckpt's bits per character of the test text (`test/bpc`), when the run tested."""
        values = self.curve("test/bpc")
        if values:
            return values[-1]
        return None if self.test_loss is None else self.test_loss / math.log(2)

    @property
    def tokens(self) -> str:
        """What the run's model reads and writes: `char`, `byte`, or `bpe 512` (data.unit, data.vocab_size)."""
        data = self.config.get("data", {})
        unit = str(data.get("unit") or "char")
        return f"{unit} {data.get('vocab_size')}" if unit == "bpe" else unit

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
        steps, seconds = steps_done(val[-1][0]), val[-1][1] - self.started
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


def steps_done(logged_step: int) -> int:
    """The training steps done when a validation logged at `logged_step`: Lightning logs it at the 0-based index of
    the last training step, so a validation after 500 steps is logged at step 499."""
    return logged_step + 1


def natural(name: str) -> list:
    """A sort key that puts sweep job 9 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    """Parameters of the run's model: the research log's count, else its last (or best) checkpoint's tensors."""
    log = path / "research_log.md"
    match = re.search(r"^Parameters: ([\d,]+)", log.read_text(encoding="utf-8"), re.M) if log.is_file() else None
    if match:
        return int(match.group(1).replace(",", ""))
    import torch

    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = path / "checkpoints" / name
        if checkpoint.is_file():
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
                return sum(tensor.numel() for name, tensor in state.items() if name.startswith("model."))
            except Exception:  # a checkpoint cut short by a crash: try the next source
                continue
    return None


def read_yaml(path: Path):
    """A `.hydra/` record as plain data, interpolations kept as written (libyaml's parser: a sweep has dozens)."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_run(path: Path, root: Path) -> Run:
    """Read one run folder; whatever is missing or unreadable becomes the run's `problem`, never an exception."""
    run = Run(path=path, name=str(path.relative_to(root)) if path != root else path.name)
    hydra_dir = path / ".hydra"
    try:
        if (hydra_dir / "config.yaml").is_file():
            run.config = read_yaml(hydra_dir / "config.yaml")
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
    overrides = [unescaped(str(o)) for o in read_yaml(hydra_dir / "overrides.yaml") or []]
    excluded: list[str] = []
    if (hydra_dir / "hydra.yaml").is_file():
        job = (read_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra", {}).get("job", {})
        excluded = list(job.get("config", {}).get("override_dirname", {}).get("exclude_keys") or [])
    return [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~") not in excluded and o not in (f"model={rung}", f"rung={rung}")
    ]


def load_runs(folder: str | Path) -> list[Run]:
    """Every run under `folder`, in ladder order (then by name). Raises UsageError if there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(
            f"{str(root)!r} is not a folder. Pass a folder of runs, e.g. outputs/ or outputs/multiruns/<date>/<time>."
        )
    folders = find_run_folders(root)
    if not folders:
        raise UsageError(
            f"No runs under {str(root)!r}: a run folder holds TensorBoard event files ({EVENTS}) or a "
            ".hydra/config.yaml. Train some first, e.g. `python train.py -m experiment=ladder`, and pass "
            "the folder it wrote (outputs/, or outputs/multiruns/<date>/<time> for one sweep)."
        )
    runs = [load_run(path, root) for path in folders]
    order = {rung: i for i, rung in enumerate(LADDER)}
    return sorted(runs, key=lambda run: (order.get(run.rung, len(LADDER)), natural(run.name)))
