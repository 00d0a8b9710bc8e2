"""The LightningModule: one rung of the ladder, its optimizer, and the tokenizer it was trained with."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import instantiate

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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return instantiate(self.hparams.optimizer, params=self.parameters())
