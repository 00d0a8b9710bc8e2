"""Messages Lightning and PyTorch print on every run that tell our users nothing, filtered by their exact text.

Nothing else is silenced: any other warning or log line still shows.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's advertisement for its cloud logger, printed when a Trainer is built
LITLOGGER_TIP = "try installing [litlogger]"
# torch 2.13 deprecates a class Lightning 2.6's pytree helpers still build (a FutureWarning at the first step)
LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# ModelCheckpoint on a resumed run, whose checkpoints/ is full by design
CHECKPOINT_DIR_NOT_EMPTY = r"Checkpoint directory .* exists and is not empty"


class DropMessage(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise(resuming: bool) -> None:
    """Filter the messages above; the checkpoint directory's only when `resuming` (elsewhere it means something)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessage) and f.text == LITLOGGER_TIP for f in rank_zero.filters):
        rank_zero.addFilter(DropMessage(LITLOGGER_TIP))
    warnings.filterwarnings("ignore", message=LEAFSPEC, category=FutureWarning)
    if resuming:
        warnings.filterwarnings("ignore", message=CHECKPOINT_DIR_NOT_EMPTY)
