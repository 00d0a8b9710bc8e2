"""Taking back what Hydra wrote for a run that was refused before it trained: nothing to list, nothing to resume."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path


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
