"""Run folders: names that paste back into commands, the overrides as typed, and taking back what Hydra wrote
for a run that was refused before it trained (nothing to list, nothing to resume)."""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from shakespeare.errors import UsageError
from shakespeare.model.loading import BEST, EXAMPLE

RUNS = ("*/*/checkpoints", "multiruns/*/*/*/checkpoints")  # outputs/<date>/<time>_<rung>, and a sweep's jobs
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # what a shell or Hydra's override grammar reads as syntax
LONGEST = 200  # characters of a folder name; longer ones are cut and end in a hash of the whole
FAILURE = "failure.txt"  # in a sweep job's folder: why the job failed (the sweep goes on)


def folder_name(text: str) -> str:
    r"""`text` (a rung's name, a sweep job's overrides) as a folder name that pastes back into a command
    unquoted, in any shell and in Hydra's overrides: Hydra's escapes and quotes, brackets and braces dropped,
    any other run of characters but letters, digits and `. _ + -` made one `_` (`max_time-00\:00\:30` ->
    `max_time-00_00_30`). TensorBoard names runs by these folders, and refuses a backslash in a name."""
    name = UNSAFE.sub("_", re.sub(r"\\(.)", r"\1", text).translate(str.maketrans("", "", "'\"[]{}"))).strip("_")
    if len(name) > LONGEST:
        name = f"{name[: LONGEST - 9]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name or "run"


def shown(path: str | Path) -> str:
    """`path` as a user pastes it into a command: relative to the working folder when it lies inside it."""
    path = Path(path).expanduser().resolve()
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def next_steps(folder: str | Path, sweep: bool = False) -> str:
    """Where a finished run (or sweep) is, and the commands that read it, each ready to paste."""
    where = shown(folder)
    report, board = (
        shlex.join(["python", "-m", "shakespeare.report", where]),
        shlex.join(["tensorboard", "--logdir", where]),
    )
    if sweep:
        return f"Sweep folder: {where}\n  {report}\n  {board}"
    write = shlex.join(["python", "generate.py", f"ckpt_path={where}"])
    return f"Run folder: {where}\n  {write}\n  {report}\n  {board}"


def newest_run(log_dir: str | Path, checkpoint: str) -> Path | None:
    """The run folder under `log_dir` (a run, or a sweep's job) whose `checkpoints/<checkpoint>` was written
    last: what `ckpt_path=last` means to train.py (last.ckpt, to resume) and generate.py (best.ckpt)."""
    folder = Path(log_dir).expanduser()
    found = [path for pattern in RUNS for path in folder.glob(f"{pattern}/{checkpoint}")]
    return max(found, key=lambda path: path.stat().st_mtime).parent.parent if found else None


def unescaped(override: str) -> str:
    r"""An override as a user types it: Hydra writes the overrides of a sweep's jobs with `:` and other
    characters escaped (`trainer.max_time=00\:00\:30`); without the escapes where they change nothing."""
    plain = re.sub(r"\\(.)", r"\1", override)
    if plain == override:
        return override
    parser = OverridesParser.create()
    try:
        same = parser.parse_override(plain).value() == parser.parse_override(override).value()
    except Exception:  # not an override Hydra reads (e.g. a value with a comma once unescaped)
        return override
    return plain if same else override


def close_file_logs(folder: Path) -> None:
    """Close and detach the log files Hydra opened in `folder` (its `<job>.log`), so the folder can go."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder.resolve():
            handler.close()
            root.removeHandler(handler)


def discard_refused_run(output_dir: str | Path, record: str | None, log_dir: str | Path) -> None:
    """Remove the run folder of a run refused before training if it holds nothing but Hydra's record and log
    (a new run), with the date folders above it left empty; in a resumed run's folder, only the record
    `.hydra/resumed-<time>/` this attempt added. A folder holding anything else is left alone."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    close_file_logs(folder)
    if all(path.name == ".hydra" or path.suffix == ".log" for path in folder.iterdir()):
        shutil.rmtree(folder)
        top = Path(log_dir).resolve()
        for parent in folder.resolve().parents:
            if not parent.is_relative_to(top) or any(parent.iterdir()):
                break
            parent.rmdir()
    elif record and Path(record).name.startswith("resumed-") and (folder / record).is_dir():
        shutil.rmtree(folder / record)


def run_overrides() -> list[str]:
    """The command-line overrides of this run (empty outside Hydra, e.g. in tests composing configs)."""
    return [unescaped(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def checkpoint_of(ckpt_path: str, log_dir: str) -> str | Path:
    """What `ckpt_path` names: a checkpoint or run folder as given; `last`: the best.ckpt of the newest run under
    `log_dir` (a run, or a sweep's job)."""
    if ckpt_path != "last":
        return ckpt_path
    run = newest_run(log_dir, BEST.name)
    if run is None:
        raise UsageError(
            f"ckpt_path=last found no run to write with: no {Path(log_dir) / '<date>/<time>_<rung>'}/{BEST}. "
            f"Train one first (python train.py), or pass a run folder or a checkpoint such as {EXAMPLE}."
        )
    return run / BEST
