"""The LightningModule: one rung of the ladder, its optimizer, and the tokenizer it was trained with."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import instantiate
from torchmetrics import MeanMetric

from shakespeare.model import GeneratorConfig, ShakespeareGenerator
from shakespeare.tokenizer import CharTokenizer


class ShakespeareModule(L.LightningModule):
    """Trains a `ShakespeareGenerator` on next-character prediction.

    Every argument is plain data (lists, dicts, numbers, strings), so a checkpoint alone rebuilds the
    model and the tokenizer, and loads with PyTorch's safe `weights_only` loading.
    """

    def __init__(self, vocabulary: list[str], model: dict, optimizer: dict):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs its curated hyperparameters itself
        self.tokenizer = CharTokenizer(vocabulary)
        self.model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(vocabulary), **model))
        self.train_loss = MeanMetric()  # the epoch's mean: ~0.1 ms a step, where self.log costs ~1 ms a call

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.train_loss.update(loss.detach())
        if self.train_loss.update_count == 1:  # once an epoch: Lightning computes, syncs and resets it at the end
            self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the steps whose values the logger writes
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return instantiate(self.hparams.optimizer, params=self.parameters())
