"""Sweeps that survive a failing job: the job is recorded and the sweep goes on, then ends with a summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from shakespeare.errors import EXPLAINED

log = logging.getLogger("shakespeare")

FAILURE = "failure.txt"


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
        failures = sorted(Path(config.hydra.sweep.dir).glob(f"*/{FAILURE}"))
        if not failures:
            return
        jobs = len([p for p in Path(config.hydra.sweep.dir).iterdir() if p.is_dir() and not p.name.startswith(".")])
        lines = [f"{len(failures)} of {jobs} sweep jobs failed (the others finished and kept their results):"]
        for failure in failures:
            lines.append(f"  {failure.parent}: {failure.read_text(encoding='utf-8').strip()}")
        log.error("\n".join(lines))
        sys.exit(1)
