"""Equal time that a busy machine cannot bend: a time budget turned into a step count before training.

A wall-clock budget buys fewer steps whenever anything else runs, so a rung trained beside a neighbour loses for
reasons that are not its own. In the equal-time mode (`equal_time.budget`), the budget is what a quiet reference
rung buys: its quiet step time is measured once per machine and shape and kept in the cache; each run then
measures its own step time against the reference's in alternating bursts (load slows both sides of the ratio
alike) and trains the steps that ratio buys, whatever the load does later. The calibration is written into the
run folder (calibration.json) and the research log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.ranges import AT_LEAST_1
from shakespeare.run.composition import CONFIG_DIR
from shakespeare.run.folders import run_overrides
from shakespeare.run.host import busy_cores
from shakespeare.training.lines import budget_seconds

log = logging.getLogger("shakespeare")

RECORD = "calibration.json"
clock: Callable[[], float] = time.perf_counter  # tests replace it


@dataclass(frozen=True)
class EqualTime:
    """equal_time's settings: `budget` (days:hours:minutes:seconds; null: off) at the quiet speed of the
    `reference` rung, measured in `bursts` alternating bursts of `steps` training steps of each model."""

    budget: str | dict | None = None
    reference: str = "block_norm_dropout"
    bursts: Annotated[int, AT_LEAST_1] = 5
    steps: Annotated[int, AT_LEAST_1] = 4
    recalibrate: bool = False  # measure the reference's quiet step time again (else the cached one)


@dataclass
class Calibration:
    """What the calibration measured and the steps it bought."""

    budget_seconds: float
    reference: str
    reference_quiet_step: float  # seconds, the cached quiet figure
    reference_steps: list[float]  # seconds a step, burst by burst
    run_steps: list[float]
    ratio: float  # this rung's step time over the reference's (the median over the bursts)
    steps: int  # what the budget buys this rung: budget / quiet reference step / ratio
    load: float | None  # the 1-minute load average during the calibration
    measured_quiet_now: bool


def timed_steps(model: ShakespeareGenerator, optimizer: torch.optim.Optimizer, batch: tuple, steps: int) -> float:
    """Seconds a training step takes (forward, backward, optimizer step), averaged over `steps` steps."""
    start = clock()
    for _ in range(steps):
        model.loss(*batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (clock() - start) / steps


def trainer_parts(model: DictConfig, optimizer: DictConfig, vocab_size: int) -> tuple[ShakespeareGenerator, Any]:
    """A model and its optimizer as training builds them (weights drawn on a generator of their own)."""
    state = torch.get_rng_state()
    try:
        net = ShakespeareGenerator(
            GeneratorConfig(vocab_size=vocab_size, **OmegaConf.to_container(model, resolve=True))
        )
    finally:
        torch.set_rng_state(state)  # the run's own draws are untouched
    return net.train(), instantiate(optimizer, params=net.named_parameters())


def reference_config(reference: str) -> DictConfig:
    """The run's config with its rung swapped for `reference` (the same shape, the reference's own optimizer)."""
    chosen = [o for o in run_overrides() if o.split("=", 1)[0].lstrip("+~") not in ("model", "rung")]
    hydra = GlobalHydra.instance()
    with nullcontext() if hydra.is_initialized() else initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for group in ("rung", "model"):
            try:
                return compose("train", [*chosen, f"{group}={reference}"])
            except MissingConfigException:  # no rung config of that name: the model config alone
                continue
    raise UsageError(
        f"equal_time.reference={reference!r} is not a rung: name a model or rung config, e.g. "
        "equal_time.reference=block_norm_dropout."
    )


def quiet_step_file(cache_dir: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / "calibration" / f"{digest}.json"


def calibrate(cfg: DictConfig, vocab_size: int, settings: EqualTime) -> Calibration:
    """Measure this rung against the reference and return the steps `settings.budget` buys it."""
    budget = budget_seconds(settings.budget, "equal_time.budget")
    shape = (cfg.data.batch_size, cfg.data.sequence_length)
    batch = (torch.randint(1, vocab_size, shape), torch.randint(1, vocab_size, shape))
    reference_cfg = reference_config(settings.reference)
    run_model, run_optimizer = trainer_parts(cfg.model, cfg.optimizer, vocab_size)
    ref_model, ref_optimizer = trainer_parts(reference_cfg.model, reference_cfg.optimizer, vocab_size)
    timed_steps(run_model, run_optimizer, batch, 1)  # warm-up: the allocator, the kernels' first calls
    timed_steps(ref_model, ref_optimizer, batch, 1)
    ref_times, run_times = [], []
    for burst in range(settings.bursts):  # alternating, in turn first, so load falls on both sides alike
        order = ((ref_model, ref_optimizer, ref_times), (run_model, run_optimizer, run_times))
        for model, optimizer, times in order if burst % 2 == 0 else reversed(order):
            times.append(timed_steps(model, optimizer, batch, settings.steps))
    ratio = statistics.median(run / ref for run, ref in zip(run_times, ref_times))
    key = {
        "reference": OmegaConf.to_container(reference_cfg.model, resolve=True),
        "shape": shape,
        "vocab": vocab_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.node(),
        "cpu": platform.processor(),
        "optimizer": OmegaConf.to_container(reference_cfg.optimizer, resolve=True),
    }
    record = quiet_step_file(cfg.paths.cache_dir, key)
    quiet, measured = read_quiet_step(record), False
    if quiet is None or settings.recalibrate:
        quiet, measured = min(ref_times), True  # the quickest burst: the machine at its quietest
        if (busy := busy_cores()) is not None and busy >= 0.5:
            log.warning(
                "The reference's quiet step time is measured now, for every later run on this machine, but other work "
                "keeps %.1f cores busy: once the machine is quiet, measure it again with equal_time.recalibrate=true.",
                busy,
            )
        record.parent.mkdir(parents=True, exist_ok=True)
        record.with_suffix(".part").write_text(json.dumps({"quiet_step": quiet, "key": key}), encoding="utf-8")
        os.replace(record.with_suffix(".part"), record)
    steps = int(budget / quiet / ratio)
    if steps < 1:
        raise UsageError(
            f"equal_time.budget={settings.budget} buys no step of this rung (a step takes {quiet * ratio:.2f} s at the "
            "reference's quiet speed). Give it a longer budget."
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return Calibration(budget, settings.reference, quiet, ref_times, run_times, ratio, steps, load, measured)


def read_quiet_step(record: Path) -> float | None:
    try:
        quiet = json.loads(record.read_text(encoding="utf-8"))["quiet_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return quiet if isinstance(quiet, float) and quiet > 0 else None


def write_calibration(calibration: Calibration, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    partial = run / (RECORD + ".part")
    partial.write_text(json.dumps(asdict(calibration), indent=1), encoding="utf-8")
    os.replace(partial, run / RECORD)


def read_calibration(run: Path) -> Calibration | None:
    try:
        return Calibration(**json.loads((run / RECORD).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
