"""What looking inside a rung costs a run: the attention grid after every validation (a side pass over one
passage, drawn with Pillow), the loss by position inside validation, the character embeddings at the end.

    python benchmarks/inspection.py                          # block_norm_dropout at the ladder's settings, 2 epochs
    python benchmarks/inspection.py --rung multihead --epochs 3 --repeats 7
    python benchmarks/inspection.py trainer.limit_train_batches=50     # any config override: a quick look

One real training run (batch 1024, sequence 8, the ladder's settings) with the Inspection callback, its hooks
timed from the inside, so the epoch they are compared with is the same epoch; then, on that run's trained
model, the validation loss kept per position against the plain mean loss (on each batch's logits, both ways
in alternating order; medians of the passes). Prints each cost, its share of an epoch (target: <= 2%) and the load average. Run it from the
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

from shakespeare.cli.train import fit  # noqa: E402
from shakespeare.training.callbacks import Inspection  # noqa: E402
from shakespeare.training.inspection import LossByPosition  # noqa: E402


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


def validation_passes(module, batches) -> tuple[float, float]:
    """Seconds for the validation step's loss over `batches` past the forward pass, which is the same both
    ways: (the mean alone, kept per position too). Each batch's logits are computed once and both ways time
    only what follows, back to back in alternating order, so a busy neighbour slows both alike."""
    model, metric = module.model, LossByPosition(module.model.cfg.sequence_length)
    seconds = [0.0, 0.0]
    with torch.inference_mode():
        for i, (idx, targets) in enumerate(batches):
            logits = model(idx)
            model.forward = lambda idx, logits=logits: logits  # the forward is the same both ways: leave it out
            for by_position in (False, True) if i % 2 else (True, False):
                start = time.perf_counter()
                if by_position:  # what validation_step does
                    losses = model.losses(idx, targets)
                    metric.update(losses)
                    losses.mean()
                else:  # what it did before
                    model.loss(idx, targets)
                seconds[by_position] += time.perf_counter() - start
            del model.forward
    return seconds[0], seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rung", default="block_norm_dropout")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="validation passes, each batch both ways")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
    args = parser.parse_args()
    before = os.getloadavg()
    cfg = config(
        [
            f"model={args.rung}",
            "data.batch_size=1024",
            "data.sequence_length=8",
            f"trainer.max_epochs={args.epochs}",
            "trainer.enable_progress_bar=false",
            f"callbacks.inspection._target_={__name__}.TimedInspection",
            *args.overrides,
        ]
    )
    fit(cfg)
    run = TimedInspection.runs[-1]
    run.module.eval()
    plain, by_position = zip(*(validation_passes(run.module, run.batches) for _ in range(args.repeats)))
    epoch = statistics.median(run.epochs)
    side = statistics.median(run.validations)
    extra = statistics.median(by_position) - statistics.median(plain)
    total = side + run.batch_hooks / args.epochs + extra
    steps = run.module.trainer.num_training_batches
    print(
        f"\n{args.rung}, batch 1024, sequence 8: {args.epochs} epochs of {steps} steps, torch threads {torch.get_num_threads()}"
    )
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in before)}; after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"epoch (training + validation), median:             {epoch:8.2f} s")
    print(
        f"attention side pass + grid, per validation:        {1e3 * side:8.1f} ms  "
        f"({100 * side / epoch:.2f}% of an epoch; first {1e3 * run.validations[0]:.1f} ms)"
    )
    print(
        f"loss by position inside validation, per epoch:     {1e3 * extra:8.1f} ms  ({100 * extra / epoch:.2f}%; "
        f"the loss past the forward: {1e3 * statistics.median(plain):.1f} ms plain vs {1e3 * statistics.median(by_position):.1f} ms "
        f"per position over {len(run.batches)} batches, medians of {args.repeats})"
    )
    print(f"passage capture, per epoch:                        {1e3 * run.batch_hooks / args.epochs:8.2f} ms")
    print(f"character embeddings for the Projector, once a run: {1e3 * run.end:8.1f} ms")
    verdict = "meets" if total <= 0.02 * epoch else "MISSES"
    print(f"overhead per epoch: {100 * total / epoch:.2f}% of an epoch (target <= 2%): {verdict}")


if __name__ == "__main__":
    main()
