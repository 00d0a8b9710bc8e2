"""Sweeps that survive a failing job: the job is recorded and the sweep goes on, then ends with a summary."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from shakespeare.errors import EXPLAINED
from shakespeare.internals import LAUNCHER_LOGGERS
from shakespeare.run.folders import FAILURE, next_steps, unescaped

log = logging.getLogger("shakespeare")

JOB_LINE = re.compile(r"^(\t#\d+ : )(.*)$", re.S)


class TypedOverrides(logging.Filter):
    r"""Shows the sweep log's job lines (`#0 : trainer.max_time=00\:00\:30`) with each override as the user typed
    it, without Hydra's escapes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.args and (line := JOB_LINE.match(record.msg)):
            record.msg = line[1] + " ".join(unescaped(override) for override in line[2].split(" "))
        return True


def show_typed_overrides() -> None:
    for name in LAUNCHER_LOGGERS:
        launcher = logging.getLogger(name)
        if not any(isinstance(f, TypedOverrides) for f in launcher.filters):
            launcher.addFilter(TypedOverrides())


def record_failure(err: BaseException) -> None:
    """Log a sweep job's error and leave it in the job's folder for the summary."""
    if isinstance(err, EXPLAINED):
        log.error("%s", err)
    else:
        log.exception("This job failed; the sweep goes on with the next one.")
    message = str(err) if isinstance(err, EXPLAINED) else f"{type(err).__name__}: {err}"
    (Path(HydraConfig.get().runtime.output_dir) / FAILURE).write_text(message + "\n", encoding="utf-8")


class SweepSummary(Callback):
    """After a `-m` sweep, lists the jobs that failed and exits non-zero; the other jobs keep their results."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(next_steps(config.hydra.sweep.dir, sweep=True), flush=True)
        failures = sorted(Path(config.hydra.sweep.dir).glob(f"*/{FAILURE}"))
        if not failures:
            return
        jobs = len([p for p in Path(config.hydra.sweep.dir).iterdir() if p.is_dir() and not p.name.startswith(".")])
        lines = [f"{len(failures)} of {jobs} sweep jobs failed (the others finished and kept their results):"]
        for failure in failures:
            lines.append(f"  {failure.parent}: {failure.read_text(encoding='utf-8').strip()}")
        log.error("\n".join(lines))
        sys.exit(1)


def sweeping() -> bool:
    """Whether this process runs a job of a `-m` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
