"""The exceptions users see: each explained in one paragraph, never as a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(Exception):
    """A bad config value, file, prompt or checkpoint. The message names the value and the fix."""


class Stopped(Exception):
    """A run that ended before its last step; the message says what was saved and how to go on.

    In a run of several processes every one of them raises it, and one prints it: `speaker` says whether
    this process is that one (None: rank 0).
    """

    def __init__(self, message: str, exit_code: int, speaker: bool | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.speaker = speaker


class Interrupted(Stopped):
    """A run stopped by Ctrl-C, SIGTERM or SLURM's requeue signal."""


class Fault(Stopped):
    """A run stopped by the machine: a lost process, a checkpoint that could not be written."""

    def __init__(self, message: str, exit_code: int = 1, speaker: bool | None = None):
        super().__init__(message, exit_code, speaker)


EXPLAINED = (UsageError, Fault)  # errors shown as their message alone


def speaks(err: BaseException) -> bool:
    """Whether this process prints `err`: rank 0, or the process the error chose (a survivor of a lost rank 0)."""
    speaker = getattr(err, "speaker", None)
    if speaker is not None:
        return speaker
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # only a run's errors get here: Lightning is in

    return rank_zero_only.rank == 0


@contextmanager
def explained_exit() -> Iterator[None]:
    """A command's body: a UsageError is its one paragraph on the log and exit 2; Ctrl-C ends the line and exits 130."""
    try:
        yield
    except UsageError as err:
        logging.getLogger("shakespeare").error("%s", err)
        sys.exit(2)
    except KeyboardInterrupt:
        print(flush=True)
        sys.exit(130)
