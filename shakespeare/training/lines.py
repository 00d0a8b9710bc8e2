"""The research log's language: a line per epoch (or per validation of a budget run) on the terminal, and
research_log.md in the run folder."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import OmegaConf

from shakespeare.errors import UsageError
from shakespeare.model.sampling import NewTokens, sample
from shakespeare.tokenizer import printable
from shakespeare.training.tags import ELAPSED, TOKENS_PER_SECOND

log = logging.getLogger("shakespeare")

STATUSES = ("running", "finished", "interrupted", "failed")
EVALUATION = "\n## Evaluation\n"  # evaluate.py's section of research_log.md


def console(trainer: L.Trainer, line: str) -> None:
    """Print above Lightning's progress bar instead of through it. (tqdm's own `write`: Lightning's
    `bar.print` drops the line once the training bar is closed, as it is when training ends.)"""
    bar = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        Tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def epoch_line(where: str, seconds: float, train: float | None, val: float | None, best: bool) -> str:
    """The log's line, tab-separated as the log prints it: `9/10 -- 6.50s  Train loss 2.4529  Eval loss 2.4542  <<`
    (`<<`: a new best eval loss). `where`: the epoch (`9/10`), or the step of a run that validates between epochs."""
    line = f"{where} -- {seconds:.2f}s"
    if train is not None:
        line += f" \tTrain loss \t{train:.4f}"
    if val is not None:
        line += f" \tEval loss \t{val:.4f}" + (" \t<<" if best else "")
    return line


def completed_line(elapsed: float) -> str:
    return f"Training completed. Elapsed time: {elapsed:.2f}s"


def budget_timer(trainer: L.Trainer) -> Timer | None:
    """Lightning's Timer when the run has a time budget (trainer.max_time)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return timer if timer is not None and timer.time_remaining() is not None else None


def budget_seconds(max_time: object, key: str = "trainer.max_time") -> float | None:
    """A time budget (trainer.max_time, or the config `key` that holds one) in seconds (None: no budget), read as
    Lightning's Timer reads it."""
    if max_time is None:
        return None
    try:
        seconds = Timer(
            OmegaConf.to_container(max_time) if OmegaConf.is_config(max_time) else max_time
        ).time_remaining()
    except (MisconfigurationException, TypeError, ValueError, AttributeError):
        seconds = None
    if seconds is None or seconds <= 0:
        raise UsageError(
            f"{key}={max_time!r} is not a time budget: write days:hours:minutes:seconds, e.g. "
            f"{key}=00:00:10:00 for ten minutes (or {key}={{minutes:10}}), or null for none."
        )
    return seconds


def by_epoch(trainer: L.Trainer) -> bool:
    """Whether the run counts epochs and validates at their ends (the log's runs), rather than every so many steps."""
    return (
        trainer.max_epochs not in (None, -1)
        and trainer.check_val_every_n_epoch is not None
        and trainer.val_check_batch >= trainer.num_training_batches
    )


def progress(trainer: L.Trainer) -> str:
    """Where a line stands: `9/10` (epochs validated at their ends); for validation every so many steps the step,
    after the epoch when epochs count (`0/10 step 500`), with trainer.max_steps (`step 500/2000`) and the time
    budget (`step 500 (37 s of 580 s)`)."""
    epochs = trainer.max_epochs not in (None, -1)
    if by_epoch(trainer):
        return f"{trainer.current_epoch}/{trainer.max_epochs}"
    text = f"{trainer.current_epoch}/{trainer.max_epochs} " if epochs else ""
    text += f"step {trainer.global_step}" + (f"/{trainer.max_steps}" if trainer.max_steps not in (None, -1) else "")
    if timer := budget_timer(trainer):
        spent = timer.time_elapsed("train")
        text += f" ({spent:.0f} s of {spent + timer.time_remaining('train'):.0f} s)"
    return text


class EpochLine(L.Callback):
    """Prints the log's line, `9/10 -- 6.50s  Train loss 2.4529  Eval loss 2.4542  <<`, after every validation
    and at the end of an epoch without one, and `Training completed. Elapsed time: ...` at the end.

    A line covers the interval since the one before: its time, the mean training loss of its steps (the
    module's), the validation loss, and the training throughput (validation time left out). Each line's
    throughput and the run's elapsed time go to the loggers (`throughput/tokens_per_sec`, `time/elapsed`).
    The open interval travels in checkpoints, so a resumed run's next line covers the steps on both sides
    of the interruption but not the time in between. `readers` get every line (the research log).
    """

    def __init__(self) -> None:
        self.elapsed = 0.0  # training time over all sessions of a resumed run
        self.tokens_per_second: float | None = None
        self.readers: list[Callable[[str], None]] = []
        self._carried = {"seconds": 0.0, "val_seconds": 0.0, "tokens": 0}  # the open interval of a checkpoint

    def emit(self, trainer: L.Trainer, line: str) -> None:
        console(trainer, line)
        for read in self.readers:
            read(line)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        now = time.perf_counter()
        self._session_start, self._elapsed_before = now, self.elapsed
        self._start, self._val_seconds, self._tokens = (
            now - self._carried["seconds"],
            self._carried["val_seconds"],
            self._carried["tokens"],
        )

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch[0].numel()  # an attribute read: no device sync

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += time.perf_counter() - self._val_start
            self.line(trainer, module, trainer.callback_metrics.get("val/loss"), module.val_loss_improved)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._tokens:  # steps since the last line: an epoch without validation
            module.close_training_interval()  # callbacks hear of the epoch's end before the module
            self.line(trainer, module, None, False)

    def line(self, trainer: L.Trainer, module: L.LightningModule, val: float | None, best: bool) -> None:
        now = time.perf_counter()
        self.elapsed = self._elapsed_before + now - self._session_start
        seconds = now - self._start
        self.tokens_per_second = self._tokens * trainer.world_size / max(seconds - self._val_seconds, 1e-9)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {TOKENS_PER_SECOND: self.tokens_per_second, ELAPSED: self.elapsed}, step=trainer.global_step
                )
            self.emit(trainer, epoch_line(progress(trainer), seconds, module.train_loss_mean, val, best))
        self._start, self._val_seconds, self._tokens = now, 0.0, 0

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.elapsed = self._elapsed_before + time.perf_counter() - self._session_start
        self.emit(trainer, completed_line(self.elapsed))

    def state_dict(self) -> dict:
        if not hasattr(self, "_start"):  # saved before training started
            return {"elapsed": self.elapsed, "interval": dict(self._carried)}
        now = time.perf_counter()
        interval = {"seconds": now - self._start, "val_seconds": self._val_seconds, "tokens": self._tokens}
        return {"elapsed": self._elapsed_before + now - self._session_start, "interval": interval}

    def load_state_dict(self, state: dict) -> None:
        self.elapsed = state["elapsed"]
        self._carried = dict(state.get("interval", self._carried))


class ResearchLog(L.Callback):
    """Keeps `research_log.md` in the run folder, in the research log's shape: the config, the model and
    optimizer, the epoch line's lines, the elapsed time, parameters, tokens/second, the best eval loss and the
    test loss (with `data.test_fraction`) in nats and in bits per character of the held-out text, and a generated
    sample.

    The file is rewritten atomically after every line of the run, so a crashed run keeps a partial entry;
    its status line says running, finished, interrupted or failed (`mark()` sets it). It reads the lines of
    the run's EpochLine, which must be among the callbacks. Writes on rank zero only.
    """

    def __init__(self, path: str | Path, command: list[str] | None = None, sample_length: NewTokens = 300) -> None:
        self.path = Path(path)
        self.command = "python train.py " + " ".join(command or [])
        self.sample_length = sample_length
        self.status, self.note = "running", ""
        self.title = self.config = self.learner = self.sample = ""
        self.parameters = 0
        self.lines: list[str] = []  # the epoch line's lines, kept across resumed sessions
        self.throughputs: list[float] = []
        self.best = math.inf
        self.best_bpc: float | None = None  # bits per character of the held-out text at the best eval loss
        self.test_loss: float | None = None
        self.test_bpc: float | None = None
        self.unit = "epoch"  # what a line covers: an epoch, or the steps between two validations
        self._epoch_line: EpochLine | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        epoch_line = next((c for c in trainer.callbacks if isinstance(c, EpochLine)), None)
        if epoch_line is None:
            raise UsageError(
                "callbacks.research_log writes the epoch line's lines, but callbacks.epoch_line is gone. "
                "Keep callbacks.epoch_line, or remove callbacks.research_log too."
            )
        if self.add_line not in epoch_line.readers:
            epoch_line.readers.append(self.add_line)
        self._epoch_line = epoch_line

    def add_line(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("Training completed") or self._epoch_line is None:
            self.write()
            return
        if self._epoch_line.tokens_per_second is not None:
            self.throughputs.append(self._epoch_line.tokens_per_second)
        self.write()

    def mark(self, status: str, note: str = "") -> None:
        """Set the entry's status (one of `STATUSES`) with an optional note, and rewrite the file."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.status, self.note = status, note
        self.write()

    @rank_zero_only
    def write(self) -> None:
        if not self.title:  # nothing known yet (e.g. marked before the fit started)
            return
        partial = self.path.with_name(self.path.name + ".part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(self.render() + self.kept_sections(), encoding="utf-8")
            os.replace(partial, self.path)  # readers never see a half-written entry
        except (
            OSError
        ) as err:  # a full disk: the entry from before stays, training goes on (or stops for its own reason)
            partial.unlink(missing_ok=True)
            log.warning("Could not update %s: %s", self.path, err)

    def kept_sections(self) -> str:
        """What evaluate.py wrote into the file (its Evaluation section): a resumed run keeps it."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return ""
        return text[text.index(EVALUATION) :] if EVALUATION in text else ""

    def render(self) -> str:
        status = f"{self.status} ({self.note})" if self.note else self.status
        fence = "```"
        text = f"## {self.title}\n\nStatus: {status}\n\nConfig:\n{fence}\n{self.config}\n{self.command}\n"
        text += f"{self.learner}\n{fence}\n\nParameters: {self.parameters:,}\n"
        if self.throughputs:
            mean = sum(self.throughputs) / len(self.throughputs)
            lines = f"{len(self.throughputs)} {self.unit}" + ("s" if len(self.throughputs) > 1 else "")
            text += f"Throughput: {mean:,.0f} tokens/s (training, mean over {lines})\n"
        text += f"\nResult:\n{fence}\n" + "".join(line + "\n" for line in self.lines) + f"{fence}\n"
        if math.isfinite(self.best):
            bits = "" if self.best_bpc is None else f" ({self.best_bpc:.4f} bits per character)"
            text += f"\nBest eval loss: {self.best:.4f}{bits}\n"
        if self.test_loss is not None:
            bits = "" if self.test_bpc is None else f"{self.test_bpc:.4f} bits per character; "
            text += f"Test loss: {self.test_loss:.4f} ({bits}checkpoints/best.ckpt on the test split)\n"
        if self.sample:
            text += f"\nGeneration:\n{fence}\n---------- Predict from empty input:\n{self.sample}\n{fence}\n"
        return text

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        model = module.hparams.get("model", {})
        data = trainer.datamodule.hparams if trainer.datamodule is not None else {}
        stopping = trainer.early_stopping_callback
        patience = stopping.patience if stopping else None
        min_delta = abs(stopping.min_delta) if stopping else None
        settings = {
            "batch_size": data.get("batch_size"),
            "sequence_length": data.get("sequence_length"),
            "embedding_size": model.get("embedding_size"),
            "num_heads": model.get("num_heads"),
            "num_blocks": model.get("num_blocks"),
            "dropout": model.get("dropout"),
            **budget(trainer),
            "learning_rate": module.hparams.get("optimizer", {}).get("lr"),
            "patience": patience,
            "min_delta": min_delta,
            "split": data.get("split"),
            "seed": data.get("seed"),
        }
        self.title = f"{model.get('name', type(module.model).__name__)}, {time.strftime('%Y-%m-%d %H:%M')}"
        self.config = "Config(" + ", ".join(f"{key}={value}" for key, value in settings.items()) + ")"
        optimizers = "\n".join(repr(optimizer) for optimizer in trainer.optimizers)
        self.learner = (
            f"{type(module).__name__}(\nmodel={module.model}\noptimizer={optimizers}\ncriterion=CrossEntropyLoss())"
        )
        self.parameters = sum(p.numel() for p in module.parameters())
        self.mark("running")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.unit = "epoch" if by_epoch(trainer) else "validation interval"

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.best = module.val_loss_best  # written with the line the epoch line hands over next
            self.best_bpc = module.val_bpc_best

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.sample = generate_sample(module, self.sample_length) if self.sample_length else ""
        if self.status == "running":  # an interruption already marked stays marked
            self.mark("finished")
        else:
            self.write()

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        loss, bpc = trainer.callback_metrics.get("test/loss"), trainer.callback_metrics.get("test/bpc")
        if loss is not None:
            self.test_loss, self.test_bpc = float(loss), None if bpc is None else float(bpc)
            self.write()

    @rank_zero_only
    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if self.status != "running":  # already marked, e.g. by a signal handler
            return
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self.mark("interrupted", type(exception).__name__)
        else:
            self.mark("failed", "".join(traceback.format_exception_only(exception)).strip())

    def state_dict(self) -> dict:
        return {
            "lines": list(self.lines),
            "throughputs": list(self.throughputs),
            "best": self.best,
            "best_bpc": self.best_bpc,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lines, self.throughputs = list(state.get("lines", [])), list(state.get("throughputs", []))
        self.best, self.best_bpc = state.get("best", math.inf), state.get("best_bpc")


def budget(trainer: L.Trainer) -> dict:
    """What ends the run, as the research log's Config line shows it: `epochs=10` (the log's), and
    `max_steps=2000` or `max_time=580s` when those are set."""
    limits = {"epochs": trainer.max_epochs} if trainer.max_epochs not in (None, -1) else {}
    if trainer.max_steps not in (None, -1):
        limits["max_steps"] = trainer.max_steps
    if timer := budget_timer(trainer):
        limits["max_time"] = f"{timer.time_elapsed() + timer.time_remaining():.0f}s"
    return limits


def generate_sample(module: L.LightningModule, length: int) -> str:
    """A seeded sample from the empty prompt, as the log printed after training."""
    generator = torch.Generator(module.device).manual_seed(0)
    return printable(sample(module.model, module.tokenizer, "", max_new_tokens=length, generator=generator)[0])
