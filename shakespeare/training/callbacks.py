"""The run's other callbacks: the progress bar, samples while training, a stop at the first broken loss, and
the inspection of what a rung learned (TensorBoard's Images, Projector and Custom Scalars)."""

from __future__ import annotations

import sys
from typing import Annotated

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from shakespeare.errors import UsageError
from shakespeare.model.sampling import NewTokens, Seed, Temperature, TopK, check_options, sample
from shakespeare.ranges import AT_LEAST_0
from shakespeare.tokenizer import printable
from shakespeare.training.inspection import (
    attention_grid,
    attention_layers,
    attention_maps,
    character_embeddings,
    held_out_passage,
    token_labels,
)
from shakespeare.training.lines import console
from shakespeare.training.tags import ATTENTION, LOSS_BY_POSITION


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, drawn only on a terminal. When stdout is a file or a pipe (CI, SLURM,
    `| tee`) every redraw would be written out, thousands of characters a line, so the bar stays off there
    and the run prints its epoch lines alone."""

    def __init__(self, refresh_rate: Annotated[int, AT_LEAST_0] = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        if not sys.stdout.isatty():
            self.disable()


class GenerationSample(L.Callback):
    """After every validation epoch, writes a sample from empty input to TensorBoard's Text tab; at the end of
    training prints one from the final model under `Generation:`, as the log does.

    It samples with its own seeded generator, so training's random numbers are untouched, and the same
    seed every time, so the samples differ only by what the model learned.
    """

    def __init__(
        self, max_new_tokens: NewTokens = 200, temperature: Temperature = 1.0, top_k: TopK | None = None, seed: Seed = 0
    ):
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


class FinalValidation(L.Callback):
    """A run that ends at trainer.max_steps validates its last step, as a time budget's end does (Lightning
    validates once a callback asks the run to stop): the loss at the budget is the model's at its end."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


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

    def on_validation_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
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
        labels = token_labels(module.tokenizer)
        grid = attention_grid(maps, [labels[i] for i in self.passage.tolist()])
        for writer in writers:
            writer.add_image(ATTENTION, grid, global_step=trainer.global_step, dataformats="HWC")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.embeddings:
            return
        table, labels = character_embeddings(module.model, token_labels(module.tokenizer))
        for writer in self.writers(trainer):
            writer.add_embedding(table, metadata=labels, tag="character_embeddings", global_step=trainer.global_step)
