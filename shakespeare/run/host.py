"""This process's settings, applied before training: torch's thread count, denormal floats, glibc's allocator,
and the messages Lightning and PyTorch print on every run that tell our users nothing.

Those messages are filtered by their exact text; nothing else is silenced: any other warning or log line still
shows (Lightning's "GPU available but not used" warning among them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Literal

import torch

from shakespeare.errors import UsageError
from shakespeare.ranges import AT_LEAST_1

log = logging.getLogger("shakespeare")

# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
AUTO = "auto"  # host.threads=auto: one thread per core that other work leaves free when the run starts
SAMPLE_SECONDS = 0.3  # how long `busy_cores` watches the machine
TORCH_DEFAULT = torch.get_num_threads()  # one per physical core (or $OMP_NUM_THREADS), before anything sets it


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or SLURM job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other processes kept busy over the next `seconds`: the machine's busy time (/proc/stat)
    less this process's own. None where the kernel does not say (macOS, Windows)."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None

    def sample() -> tuple[float, float, float]:
        ticks = [int(n) for n in stat.read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()

    busy0, own0, t0 = sample()
    time.sleep(seconds)
    busy1, own1, t1 = sample()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


def auto_threads() -> tuple[int, str]:
    """One thread per core that other processes leave free now (at least one), and why, for the log."""
    total, busy = min(cores(), TORCH_DEFAULT), busy_cores()
    if busy is None:
        return total, f"{total} cores"
    free = max(1, min(total, round(total - busy)))
    return (
        free,
        f"{total} cores, {busy:.1f} of them busy with other work" if busy >= 0.5 else f"{total} cores, all free",
    )


def set_threads(threads: Annotated[int, AT_LEAST_1] | Literal["auto"] | None) -> None:
    """Use `threads` intra-op threads: a count, `auto` (the cores free when the run starts) or None (torch's
    default, one per core).

    One thread is the safe default: with two or more, a busy neighbour process (another run of a sweep,
    a browser) stalls every step at OpenMP's barriers and training slows down 20-40x. `auto` measures the
    neighbours once, at the start: work that starts later still stalls the run.
    """
    if threads is None:
        log.info("torch threads=%d (one per core)", torch.get_num_threads())
        return
    why = ""
    if threads == AUTO:
        threads, reason = auto_threads()
        why = f" (host.threads=auto: {reason})"
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes this one starts, e.g. trainer=ddp_spawn's
    log.info("torch threads=%d%s", threads, why)


def check_device(name: str) -> torch.device:
    """The torch device to generate or evaluate on, refused with the available ones when this machine lacks it."""
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    if str(name).split(":")[0] not in available:
        raise UsageError(f"device={name!r} is not available on this machine; available here: {', '.join(available)}.")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory instead of returning it to the OS.

    By default every block over 32 MB (the (B, H, T, T) attention tensor of the scale-up is 134 MB) is
    mapped fresh and unmapped on free, costing ~170k page faults per training step. A no-op off glibc.
    Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def flush_denormals() -> bool:
    """Treat denormal floats (below about 1e-38) as zero on the CPU.

    An x86 core takes up to a hundred times longer for arithmetic on them, and long runs make them: the
    optimizer state of rarely updated weights decays towards zero step after step. Without this a
    15-minute run of the wider speedrun shape spent 83 s on its first 500 steps and 228 s on 500 steps
    near its end; with it, 74-81 s throughout. Values that small change no loss. Returns whether the
    CPU supports it (x86 with SSE3).
    """
    return torch.set_flush_denormal(True)


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
