"""Messages Lightning and PyTorch print on every run that tell our users nothing, filtered by their exact text.

Nothing else is silenced: any other warning or log line still shows (Lightning's "GPU available but not used"
warning among them).
"""

from __future__ import annotations

import logging
import warnings

DROPPED = (
    "try installing [litlogger]",  # Lightning's advertisements for its cloud services, when a Trainer is built
    "try installing [litmodels]",
    "GPU available: ",  # the accelerators found; the run prints the one it uses, and Lightning warns of an unused GPU
    "TPU available: ",
    "`Trainer.fit` stopped: ",  # why the fit ended: the epoch lines and "Training completed" say it
)
# torch 2.13 deprecates a class Lightning 2.6's pytree helpers still build (a FutureWarning at the first step)
LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# a short run's epoch has fewer steps than the logging interval: the epoch's mean train loss is logged anyway
LOGGING_INTERVAL = r"The number of training batches \(\d+\) is smaller than the logging interval"
# ModelCheckpoint on a resumed run, whose checkpoints/ is full by design
CHECKPOINT_DIR_NOT_EMPTY = r"Checkpoint directory .* exists and is not empty"


class DropMessages(logging.Filter):
    """Drops log records whose message starts with or contains one of `texts`."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def silence_known_noise(resuming: bool) -> None:
    """Filter the messages above; the checkpoint directory's only when `resuming` (elsewhere it means something)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(DropMessages(DROPPED))
    warnings.filterwarnings("ignore", message=LEAFSPEC, category=FutureWarning)
    warnings.filterwarnings("ignore", message=LOGGING_INTERVAL)
    if resuming:
        warnings.filterwarnings("ignore", message=CHECKPOINT_DIR_NOT_EMPTY)
