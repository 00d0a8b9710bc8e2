"""Process-wide CPU settings applied before training: torch's thread count, denormal floats and glibc's allocator."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from shakespeare.errors import UsageError

# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def set_threads(threads: int | None) -> None:
    """Use `threads` intra-op threads (None: torch's default, one per core).

    One thread is the safe default: with two or more, a busy neighbour process (another run of a sweep,
    a browser) stalls every step at OpenMP's barriers and training slows down 20-40x.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(
            f"trainer.threads={threads!r} must be a whole number of at least 1 (the CPU threads torch uses), "
            "or null for torch's default of one per core. Use 1 when other work shares the machine."
        )
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes this one starts, e.g. trainer=ddp_spawn's


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
