"""Callbacks that speak the research log's language."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from shakespeare.errors import UsageError
from shakespeare.run_folder import unescaped
from shakespeare.inspection import (
    LOSS_BY_POSITION,
    attention_grid,
    attention_layers,
    attention_maps,
    character_embeddings,
    held_out_passage,
    token_label,
)
from shakespeare.sampling import check_options, sample
from shakespeare.tokenizer import printable

log = logging.getLogger("shakespeare")

BEST_VAL_LOSS = "hp/best_val_loss"  # the metric TensorBoard's HParams tab sets the hyperparameters against
TOKENS_PER_SECOND = "throughput/tokens_per_sec"
STATUSES = ("running", "finished", "interrupted", "failed")


def console(trainer: L.Trainer, line: str) -> None:
    """Print above Lightning's progress bar instead of through it. (tqdm's own `write`: Lightning's
    `bar.print` drops the line once the training bar is closed, as it is when training ends.)"""
    bar = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        Tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, drawn only on a terminal. When stdout is a file or a pipe (CI, SLURM,
    `| tee`) every redraw would be written out, thousands of characters a line, so the bar stays off there
    and the run prints its epoch lines alone."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        if not sys.stdout.isatty():
            self.disable()


def epoch_line(epoch: int, max_epochs: int, seconds: float, train: float | None, val: float | None, best: bool) -> str:
    """The log's line for one epoch: `9/10 -- 6.50s  Train loss 2.4529  Eval loss 2.4542 <<` (tab-separated)."""
    line = f"{epoch}/{max_epochs} -- {seconds:.2f}s"
    if train is not None:
        line += f" \tTrain loss \t{train:.4f}"
    if val is not None:
        line += f" \tEval loss \t{val:.4f} \t" + ("<<" if best else "")
    return line


def completed_line(elapsed: float) -> str:
    return f"Training completed. Elapsed time: {elapsed:.2f}s"


class EpochLine(L.Callback):
    """Prints the log's line per epoch, `9/10 -- 6.50s  Train loss 2.4529  Eval loss 2.4542 <<`
    (`<<` marks a new best eval loss), and `Training completed. Elapsed time: ...` at the end.

    It also measures the epoch's training throughput (`tokens_per_second`, validation time left out).
    """

    def __init__(self) -> None:
        self.best = math.inf
        self.elapsed = 0.0  # over all sessions of a resumed run
        self.tokens_per_second: float | None = None

    def emit(self, trainer: L.Trainer, line: str) -> None:
        console(trainer, line)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._session_start = self._epoch_start = time.perf_counter()  # a run resumed mid-epoch skips epoch start
        self._val_seconds, self._tokens = 0.0, 0
        self._elapsed_before = self.elapsed

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val_seconds, self._tokens = 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch[0].numel()  # an attribute read: no device sync

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += time.perf_counter() - self._val_start

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        now = time.perf_counter()
        self.elapsed = self._elapsed_before + now - self._session_start
        seconds = now - self._epoch_start
        self.tokens_per_second = self._tokens * trainer.world_size / max(seconds - self._val_seconds, 1e-9)
        metrics = trainer.callback_metrics
        train, val = metrics.get("train/loss_epoch"), metrics.get("val/loss")
        improved = val is not None and float(val) < self.best
        if improved:
            self.best = float(val)
        self.emit(trainer, epoch_line(trainer.current_epoch, trainer.max_epochs, seconds, train, val, improved))

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.emit(trainer, completed_line(self.elapsed))

    def state_dict(self) -> dict:
        return {"best": self.best, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.elapsed = state["best"], state["elapsed"]


class ResearchLog(EpochLine):
    """Keeps `research_log.md` in the run folder, in the research log's shape: the config, the model and
    optimizer, one line per epoch, the elapsed time, parameters, tokens/second, the best eval loss and the
    test loss (with `data.test_fraction`) in nats and bits per character, and a generated sample.

    The file is rewritten atomically after every step of the run, so a crashed run keeps a partial entry;
    its status line says running, finished, interrupted or failed (`mark()` sets it). The epoch's
    tokens/second also goes to the loggers, as `throughput/tokens_per_sec`. Writes on rank zero only.
    """

    def __init__(self, path: str | Path, command: list[str] | None = None, sample_length: int = 300) -> None:
        super().__init__()
        self.path = Path(path)
        self.command = "python train.py " + " ".join(unescaped(o) for o in command or [])
        self.sample_length = sample_length
        self.status, self.note = "running", ""
        self.title = self.config = self.learner = self.sample = ""
        self.parameters = 0
        self.lines: list[str] = []  # epoch lines, kept across resumed sessions
        self.throughputs: list[float] = []
        self.test_loss: float | None = None

    def emit(self, trainer: L.Trainer, line: str) -> None:
        self.lines.append(line)
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
            partial.write_text(self.render(), encoding="utf-8")
            os.replace(partial, self.path)  # readers never see a half-written entry
        except OSError as err:  # a full disk: the entry from before stays, training goes on (or stops for its own reason)
            partial.unlink(missing_ok=True)
            log.warning("Could not update %s: %s", self.path, err)

    def render(self) -> str:
        status = f"{self.status} ({self.note})" if self.note else self.status
        fence = "```"
        text = f"## {self.title}\n\nStatus: {status}\n\nConfig:\n{fence}\n{self.config}\n{self.command}\n"
        text += f"{self.learner}\n{fence}\n\nParameters: {self.parameters:,}\n"
        if self.throughputs:
            mean = sum(self.throughputs) / len(self.throughputs)
            epochs = f"{len(self.throughputs)} epoch" + ("s" if len(self.throughputs) > 1 else "")
            text += f"Throughput: {mean:,.0f} tokens/s (training, mean over {epochs})\n"
        text += f"\nResult:\n{fence}\n" + "".join(line + "\n" for line in self.lines) + f"{fence}\n"
        if math.isfinite(self.best):
            text += f"\nBest eval loss: {self.best:.4f} ({self.best / math.log(2):.4f} bits per character)\n"
        if self.test_loss is not None:
            text += (f"Test loss: {self.test_loss:.4f} ({self.test_loss / math.log(2):.4f} bits per character; "
                     "checkpoints/best.ckpt on the test split)\n")
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
            "epochs": trainer.max_epochs,
            "learning_rate": module.hparams.get("optimizer", {}).get("lr"),
            "patience": patience,
            "min_delta": min_delta,
            "split": data.get("split"),
        }
        self.title = f"{model.get('name', type(module.model).__name__)}, {time.strftime('%Y-%m-%d %H:%M')}"
        self.config = "Config(" + ", ".join(f"{key}={value}" for key, value in settings.items()) + ")"
        optimizers = "\n".join(repr(optimizer) for optimizer in trainer.optimizers)
        self.learner = f"{type(module).__name__}(\nmodel={module.model}\noptimizer={optimizers}\ncriterion=CrossEntropyLoss())"
        self.parameters = sum(p.numel() for p in module.parameters())
        self.mark("running")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, module)
        if self.tokens_per_second is not None and trainer.is_global_zero:
            self.throughputs.append(self.tokens_per_second)
            for logger in trainer.loggers:
                logger.log_metrics({TOKENS_PER_SECOND: self.tokens_per_second}, step=trainer.global_step)
            self.write()

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.sample = generate_sample(module, self.sample_length) if self.sample_length else ""
        super().on_train_end(trainer, module)  # appends "Training completed ..."
        if self.status == "running":  # an interruption already marked stays marked
            self.mark("finished")

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("test/loss")
        if loss is not None:
            self.test_loss = float(loss)
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
        return {**super().state_dict(), "lines": list(self.lines), "throughputs": list(self.throughputs)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lines, self.throughputs = list(state.get("lines", [])), list(state.get("throughputs", []))


def generate_sample(module: L.LightningModule, length: int) -> str:
    """A seeded sample from the empty prompt, as the log printed after training."""
    generator = torch.Generator(module.device).manual_seed(0)
    return printable(sample(module.model, module.tokenizer, "", max_new_tokens=length, generator=generator)[0])


class HParamsMetric(L.Callback):
    """Keeps `hp/best_val_loss`, the metric of TensorBoard's HParams tab, at the best validation loss so far."""

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor
        self.best = math.inf

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not float(value) < self.best:
            return
        self.best = float(value)
        for logger in trainer.loggers:
            logger.log_metrics({BEST_VAL_LOSS: self.best}, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]


class GenerationSample(L.Callback):
    """After every validation epoch, writes a sample from empty input to TensorBoard's Text tab; at the end of
    training prints one from the final model under `Generation:`, as the log does.

    It samples with its own seeded generator, so training's random numbers are untouched, and the same
    seed every time, so the samples differ only by what the model learned.
    """

    def __init__(self, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None, seed: int = 0):
        check_options(max_new_tokens, temperature, top_k, num_samples=1)
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed
        self.text: str | None = None

    def sample(self, module: L.LightningModule) -> str:
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        options = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k}
        return printable(sample(module.model, module.tokenizer, "", generator=generator, **options)[0])

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.max_new_tokens == 0:
            return
        self.text = self.sample(module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # indented: markdown keeps the lines as they are
                markdown = "    " + self.text.replace("\n", "\n    ")
                logger.experiment.add_text("generation/empty_input", markdown, global_step=trainer.global_step)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.max_new_tokens == 0:
            return
        console(trainer, f"Generation:\n---------- Predict from empty input:\n{self.sample(module)}")


class FiniteLoss(L.Callback):
    """Stops the run at the first NaN or infinite training loss, naming the step, before any checkpoint
    saves the broken weights (checkpoint callbacks run after this one)."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or torch.isfinite(loss):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        raise UsageError(
            f"The training loss became {float(loss)} at step {trainer.global_step} (epoch {trainer.current_epoch}), "
            f"so training stopped: the weights are broken from there on. The checkpoints saved before it are kept "
            f"(checkpoints/last.ckpt, best.ckpt). Lower the learning rate, e.g. optimizer.lr={lr / 10:g} (it was {lr:g})."
        )


class Inspection(L.Callback):
    """What a rung learned, in TensorBoard: after every validation, the attention weights of every layer
    and head over a fixed held-out passage (Images tab, `inspection/attention`); at the end of training the
    character embeddings, labelled by character, in the Projector; and one chart of the validation loss at
    every position of the window (Custom Scalars tab; the module logs them as `val_loss_by_position/<t>`).

    The passage is the first validation window that starts a line, taken from the first validation batch,
    so it is the same every epoch. The weights come from a side pass over that one passage: training and
    its fused or flash attention are untouched. Writes on rank zero, to TensorBoard loggers only.
    """

    def __init__(self, attention: bool = True, embeddings: bool = True) -> None:
        self.attention, self.embeddings = attention, embeddings
        self.passage: torch.Tensor | None = None

    @staticmethod
    def writers(trainer: L.Trainer) -> list:
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        chart = {"validation loss at each position of the window": ["Multiline", [rf"^{LOSS_BY_POSITION}/"]]}
        for writer in self.writers(trainer):
            writer.add_custom_scalars({"loss by position": chart})

    def on_validation_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.passage is None and batch_idx == 0:
            self.passage = held_out_passage(batch[0], module.tokenizer)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        writers = self.writers(trainer)
        if trainer.sanity_checking or not writers or not self.attention or self.passage is None:
            return
        if not attention_layers(module.model):  # the bigram
            return
        maps = attention_maps(module.model, self.passage.to(module.device))
        grid = attention_grid(maps, [token_label(module.tokenizer.vocabulary[i]) for i in self.passage.tolist()])
        for writer in writers:
            writer.add_image("inspection/attention", grid, global_step=trainer.global_step, dataformats="HWC")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.embeddings:
            return
        table, labels = character_embeddings(module.model, module.tokenizer.vocabulary)
        for writer in self.writers(trainer):
            writer.add_embedding(table, metadata=labels, tag="character_embeddings", global_step=trainer.global_step)
