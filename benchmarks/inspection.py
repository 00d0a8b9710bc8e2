"""What looking inside a rung costs a run: the attention grid after every validation (a side pass over one
passage, drawn with Pillow), the loss by position inside validation, the character embeddings at the end.

    python benchmarks/inspection.py                          # block_norm_dropout at the ladder's settings, 2 epochs
    python benchmarks/inspection.py --rung multihead --epochs 3 --repeats 7

One real training run (batch 1024, sequence 8, the ladder's settings) with the Inspection callback, its hooks
timed from the inside, so the epoch they are compared with is the same epoch; then, on that run's trained
model, validation with the loss kept per position against validation with the plain mean loss (interleaved,
medians). Prints each cost, its share of an epoch (target: <= 2%) and the load average. Run it from the
repository root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from speed import config  # noqa: E402

from shakespeare.callbacks import Inspection  # noqa: E402
from shakespeare.cli import fit  # noqa: E402
from shakespeare.inspection import LossByPosition  # noqa: E402


class TimedInspection(Inspection):
    """The Inspection callback, timing its own hooks and the epochs around them."""

    runs: list[TimedInspection] = []

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.validations: list[float] = []
        self.epochs: list[float] = []
        self.batch_hooks = self.end = 0.0
        TimedInspection.runs.append(self)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._epoch = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epochs.append(time.perf_counter() - self._epoch)  # training and the validation inside the epoch

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        start = time.perf_counter()
        super().on_validation_batch_start(trainer, module, batch, batch_idx, dataloader_idx)
        self.batch_hooks += time.perf_counter() - start

    def on_validation_end(self, trainer, module) -> None:
        start = time.perf_counter()
        super().on_validation_end(trainer, module)
        if not trainer.sanity_checking:
            self.validations.append(time.perf_counter() - start)

    def on_train_end(self, trainer, module) -> None:
        start = time.perf_counter()
        super().on_train_end(trainer, module)
        self.end = time.perf_counter() - start
        self.module, self.batches = module, list(trainer.val_dataloaders)


def validation_pass(module, batches, by_position: bool) -> float:
    """Seconds for the validation step's loss over `batches`: the mean alone, or kept per position too."""
    metric = LossByPosition(module.model.cfg.sequence_length)
    start = time.perf_counter()
    with torch.inference_mode():
        for idx, targets in batches:
            if by_position:  # what validation_step does
                losses = module.model.losses(idx, targets)
                metric.update(losses)
                losses.mean()
            else:  # what it did before
                module.model.loss(idx, targets)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rung", default="block_norm_dropout")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved validation passes per variant")
    args = parser.parse_args()
    before = os.getloadavg()
    cfg = config([f"model={args.rung}", "data.batch_size=1024", "data.sequence_length=8", f"trainer.max_epochs={args.epochs}",
                  "trainer.enable_progress_bar=false", f"callbacks.inspection._target_={__name__}.TimedInspection"])
    fit(cfg)
    run = TimedInspection.runs[-1]
    run.module.eval()
    plain, by_position = [], []
    for _ in range(args.repeats):  # A B A B: a busy neighbour slows both alike
        plain.append(validation_pass(run.module, run.batches, by_position=False))
        by_position.append(validation_pass(run.module, run.batches, by_position=True))
    epoch = statistics.median(run.epochs)
    side = statistics.median(run.validations)
    extra = statistics.median(by_position) - statistics.median(plain)
    total = side + run.batch_hooks / args.epochs + extra
    steps = len(run.module.trainer.train_dataloader)
    print(f"\n{args.rung}, batch 1024, sequence 8: {args.epochs} epochs of {steps} steps, torch threads {torch.get_num_threads()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in before)}; after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"epoch (training + validation), median:             {epoch:8.2f} s")
    print(f"attention side pass + grid, per validation:        {1e3 * side:8.1f} ms  "
          f"({100 * side / epoch:.2f}% of an epoch; first {1e3 * run.validations[0]:.1f} ms)")
    print(f"loss by position inside validation, per epoch:     {1e3 * extra:8.1f} ms  ({100 * extra / epoch:.2f}%; "
          f"validation {statistics.median(plain):.2f} s plain vs {statistics.median(by_position):.2f} s per position, "
          f"medians of {args.repeats} interleaved)")
    print(f"passage capture, per epoch:                        {1e3 * run.batch_hooks / args.epochs:8.2f} ms")
    print(f"character embeddings for the Projector, once a run: {1e3 * run.end:8.1f} ms")
    verdict = "meets" if total <= 0.02 * epoch else "MISSES"
    print(f"overhead per epoch: {100 * total / epoch:.2f}% of an epoch (target <= 2%): {verdict}")


if __name__ == "__main__":
    main()
