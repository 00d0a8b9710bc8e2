"""The LightningModule: one rung of the ladder, its optimizer, and the tokenizer it was trained with."""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Timer
from torchmetrics import MeanMetric, Metric

from shakespeare.budget import budget_timer, time_spent
from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.ranges import AT_LEAST_0, FRACTION, check_arguments
from shakespeare.tokenizer import tokenizer_for
from shakespeare.training.inspection import LossByPosition, position_tags
from shakespeare.training.tags import LOSS_BY_POSITION

BEST_VAL_LOSS = "hp/best_val_loss"  # the metric TensorBoard's HParams tab sets the hyperparameters against
TRAIN_LOSS = "train/loss"  # the mean training loss of each line: an epoch, or the steps between validations


class TextCovered(Metric):
    """The tokens a held-out pass predicts and the characters of the text they spell, summed over batches and
    processes: a loss per token times tokens / characters is the loss per character."""

    full_state_update = False

    def __init__(self, characters: list[int]):
        super().__init__()  # whole numbers, exact at any size, on every device (MPS has no float64)
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("characters", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.counts = torch.tensor(characters, dtype=torch.long)  # characters per id (the tokenizer's)

    def update(self, targets: torch.Tensor) -> None:
        if self.counts.device != targets.device:
            self.counts = self.counts.to(targets.device)
        self.tokens += targets.numel()
        self.characters += self.counts[targets].sum()

    def compute(self) -> float:
        """Tokens per character: 1 for characters, and for bytes of a text of single-byte characters."""
        tokens, characters = int(self.tokens), int(self.characters)
        return tokens / characters if characters else 1.0


def bits_per_character(loss: torch.Tensor | float, tokens_per_character: float) -> float:
    """A held-out loss in nats per token as bits per character of the text: total nats / its characters / ln 2."""
    return float(loss) * tokens_per_character / math.log(2)


class ShakespeareModule(L.LightningModule):
    """Trains a `ShakespeareGenerator` on next-token prediction.

    Every argument is plain data (lists, dicts, numbers, strings), so a checkpoint alone rebuilds the
    model and the tokenizer, and loads with PyTorch's safe `weights_only` loading: a BPE's tokenizer is its
    JSON definition (`tokenizer`; None for characters and bytes, whose vocabulary says everything).
    """

    def __init__(
        self,
        vocabulary: list[str],
        model: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        tokenizer: str | None = None,
    ):
        super().__init__()
        if scheduler:
            check_scheduler(scheduler)
        self.save_hyperparameters(logger=False)  # the run logs its curated hyperparameters itself
        self.tokenizer = tokenizer_for(vocabulary, tokenizer)  # the 256 bytes, a BPE, or the text's characters
        self.model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(vocabulary), **model))
        self.val_text, self.test_text = TextCovered(self.tokenizer.characters), TextCovered(self.tokenizer.characters)
        self.val_bpc: float | None = None  # the last validation's bits per character
        self.val_bpc_best: float | None = None  # at the lowest validation loss (they fall together)
        # the training loss since the last line (an epoch, or the steps since the last validation): ~0.1 ms a step,
        # where self.log costs ~1 ms a call; its mean is `train_loss_mean` once the interval closes
        self.train_loss = MeanMetric()
        self.train_loss_mean: float | None = None
        if self.model.cfg.compile:
            self.model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
        self.val_loss_best = math.inf  # the run's one record of it, kept in checkpoints beside the weights
        self.val_loss_improved = False  # whether the last validation set a new best
        self.val_loss_by_position = LossByPosition(self.model.cfg.sequence_length)
        self.loss_by_position: list[float] = []  # the last validation's, positions 1..T

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.train_loss.update(loss.detach())
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the steps whose values the logger writes
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.model.losses(*batch)  # (B, T)
        self.val_loss_by_position.update(losses)
        self.val_text.update(batch[1])
        loss = losses.mean()
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.test_text.update(batch[1])
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def on_test_epoch_end(self) -> None:
        tokens_per_character = self.test_text.compute() if self.test_text.update_count else 1.0  # all ranks call it
        self.test_text.reset()
        loss = self.trainer.callback_metrics.get("test/loss")
        if loss is not None:
            self.log("test/bpc", bits_per_character(loss, tokens_per_character), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Log `val/bpc` (the loss in bits per character of the held-out text, whatever the unit: the unit the
        literature reports, and the one runs of every unit share); track the lowest validation loss so far,
        `val/loss_best` (what sweeps minimise, and TensorBoard's HParams metric); log the validation loss at each
        position of the window, as `val_loss_by_position/<t>`; close the training interval."""
        if self.val_loss_by_position.update_count:
            self.loss_by_position = self.val_loss_by_position.compute().tolist()  # summed over ranks: all call it
            self.val_loss_by_position.reset()
        tokens_per_character = self.val_text.compute() if self.val_text.update_count else 1.0  # the same: all call it
        self.val_text.reset()
        loss = self.trainer.callback_metrics.get("val/loss")  # this validation's, already averaged over ranks
        if self.trainer.sanity_checking or loss is None:
            return
        self.val_bpc = bits_per_character(loss, tokens_per_character)  # nats / ln 2 for characters
        self.log("val/bpc", self.val_bpc, sync_dist=True)
        tags = position_tags(len(self.loss_by_position), LOSS_BY_POSITION)
        for logger in self.loggers:  # T values as one logger call: T calls of self.log would cost ~T ms
            logger.log_metrics(dict(zip(tags, self.loss_by_position)), step=self.global_step)
        self.val_loss_improved = float(loss) < self.val_loss_best
        if self.val_loss_improved:
            self.val_loss_best, self.val_bpc_best = float(loss), self.val_bpc
            for logger in self.loggers:
                logger.log_metrics({BEST_VAL_LOSS: self.val_loss_best}, step=self.global_step)
        self.log("val/loss_best", self.val_loss_best, sync_dist=True, logger=False)  # for sweepers; equal on all ranks
        self.close_training_interval()

    def on_train_epoch_end(self) -> None:
        self.close_training_interval()  # an epoch without validation, or the steps after the last one

    def close_training_interval(self) -> None:
        """`train_loss_mean`: the mean training loss since the interval began, over every process; logged as
        `train/loss`. Every process calls it at the same point (the mean is a collective)."""
        if not self.train_loss.update_count:
            return
        self.train_loss_mean = float(self.train_loss.compute())
        self.train_loss.reset()
        for logger in self.loggers:
            logger.log_metrics({TRAIN_LOSS: self.train_loss_mean}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_loss_best"] = self.val_loss_best
        checkpoint["val_bpc_best"] = self.val_bpc_best
        # the open training interval, summed over every process (all save at the same step), so a resumed run's
        # next line averages the steps before the interruption too
        state = torch.stack([self.train_loss.mean_value, self.train_loss.weight]).float()
        checkpoint["train_loss_interval"] = self.trainer.strategy.reduce(state, reduce_op="sum").tolist()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_loss_best = checkpoint.get("val_loss_best", math.inf)
        self.val_bpc_best = checkpoint.get("val_bpc_best")
        total, weight = checkpoint.get("train_loss_interval", (0.0, 0.0))
        self.train_loss.reset()
        if weight and (self._trainer is None or self.trainer.global_rank == 0):  # once: the sum covers every process
            self.train_loss.update(torch.tensor(total / weight), weight=weight)

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, params=self.model.named_parameters())  # names: Muon's split
        budget = budget_timer(self.trainer.callbacks)  # Lightning's Timer, for max_time
        settings = self.hparams.get("scheduler") or (TIME_BUDGET_SCHEDULE if budget else None)
        if not settings:
            return optimizer
        total = self.trainer.estimated_stepping_batches  # trainer.max_steps, or epochs x batches per epoch (or inf)
        factor = partial(scheduled_factor, total_steps=total, timer=budget, settings=settings)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# A time budget always ends annealed: a run with trainer.max_time and no scheduler keeps its learning rate at
# first and decays it over the budget, to min_lr_factor x optimizer.lr when the time is up.
TIME_BUDGET_SCHEDULE = {"warmup_steps": 0, "min_lr_factor": 0.1}


def scheduled_factor(step: int, total_steps: float, timer: Timer | None, settings: dict) -> float:
    """The learning rate's factor at `step` of a run whose budget is `total_steps`, `timer`'s time, or both."""
    return warmup_cosine(step, total_steps, **settings, time_spent=time_spent(timer))


def check_scheduler(scheduler: dict) -> None:
    """Refuse scheduler settings `warmup_cosine` cannot follow, naming the key."""
    if unknown := set(scheduler) - {"warmup_steps", "min_lr_factor"}:
        raise UsageError(
            f"scheduler.{sorted(unknown)[0]} is not a setting; warmup_cosine takes warmup_steps and min_lr_factor."
        )
    check_arguments(warmup_cosine, scheduler, "scheduler")


def warmup_cosine(
    step: int,
    total_steps: float,
    warmup_steps: Annotated[int, AT_LEAST_0],
    min_lr_factor: Annotated[float, FRACTION],
    time_spent: float = 0.0,
) -> float:
    """The learning rate's factor at `step`: linear warm-up, then cosine decay to `min_lr_factor` at the end of
    the budget: the last step, or the end of trainer.max_time (`time_spent`: the fraction of it used),
    whichever comes first, so a run stopped by either ends annealed (a budget spent during the warm-up too)."""
    ramp = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    progress = max(0.0, min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)), time_spent)
    return min(ramp, min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
