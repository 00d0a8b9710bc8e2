"""The sliding windows the models learn from, served over a text's memory-mapped token cache.

Memory does not grow with the corpus beyond the mapped tokens: window starts are computed from their
index (never stored one per character), and an epoch's shuffle of more than `TABLE_LIMIT` windows is a
seeded Feistel permutation evaluated batch by batch. Up to `TABLE_LIMIT` windows it is `torch.randperm`'s
table, as it always was, so tinyshakespeare runs draw the very batches (and reach the very losses) they
did before the cache existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

TABLE_LIMIT = 1 << 22  # windows whose epoch order may be a randperm table (8 bytes a window: 32 MB at most)
LOOKAHEAD = 1 << 16  # window starts computed at once (a few batches' worth): tensor ops cost per call, not per element


class Windows:
    """The start offsets of one split's windows, computed from their index instead of stored: runs of evenly
    spaced starts, one per source file the split touches (no window spans two files), or, for the log's
    random_windows split, a table."""

    def __init__(self, runs: list[tuple[int, int, int]] = (), table: torch.Tensor | None = None):
        runs = [run for run in runs if run[1] > 0]  # (first start, count, step)
        self.table = table
        self.first, self.count, self.step = (torch.tensor([run[i] for run in runs], dtype=torch.long) for i in range(3))
        self.ends = self.count.cumsum(0)
        self.n = len(table) if table is not None else int(self.count.sum())

    @classmethod
    def spanning(cls, bounds: list[int], lo: int, hi: int, sequence_length: int, step: int) -> Windows:
        """Every `step`-th window of T+1 tokens inside [lo, hi) that lies within one file (`bounds`: file offsets)."""
        runs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            first, last = max(start, lo), min(end, hi)
            runs.append((first, len(range(first, last - sequence_length, step)), step))
        return cls(runs)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[index]
        if len(self.first) == 1:
            first, step = int(self.first[0]), int(self.step[0])
            return index if (first, step) == (0, 1) else first + index * step
        run = torch.searchsorted(self.ends, index, right=True)
        return self.first[run] + (index - self.ends[run] + self.count[run]) * self.step[run]

    def all(self) -> torch.Tensor:
        """Every start, as a tensor (for tests and small texts: 8 bytes a window)."""
        return self[torch.arange(self.n)]


class FeistelPermutation:
    """A seeded permutation of range(n), computed element by element in constant memory.

    A balanced Feistel network is a bijection on [0, 4^h) whatever its round function; indices it maps past
    n are mapped again until they land inside (cycle walking, under 4 rounds on average as 4^h < 4n).
    """

    ROUNDS = 4  # Luby-Rackoff: four rounds of a pseudo-random function make a pseudo-random permutation

    def __init__(self, n: int, seed: int):
        if not 0 < n <= 1 << 62:
            raise ValueError(f"a Feistel permutation covers 1 to 2**62 elements, not {n}")
        self.n, self.half = n, max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = torch.randint(0, 1 << 31, (self.ROUNDS,), generator=torch.Generator().manual_seed(seed)).tolist()

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:  # round function: a multiply-xorshift hash of (right ^ key); < 2^31 * 2^27 fits int64
            mixed = (right ^ key).mul_(0x45D9F3B).bitwise_and_(0xFFFFFFFF)
            mixed.bitwise_xor_(mixed >> 16).bitwise_and_(self.mask)
            left, right = right, mixed.bitwise_xor_(left)
        return left.bitwise_left_shift_(self.half).bitwise_or_(right)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        x = self._network(index)
        while (outside := x >= self.n).any():
            x[outside] = self._network(x[outside])
        return x


def permutation(n: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Epoch order: index -> window. randperm's table up to TABLE_LIMIT windows, a Feistel network past it."""
    if n <= TABLE_LIMIT:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).__getitem__
    return FeistelPermutation(n, seed)


class SlidingWindows:
    """Batches of windows x = text[i:i+T], y = text[i+1:i+T+1], assembled by tensor indexing.

    It is an iterable Lightning feeds straight to the model. Its position within an epoch is part of
    its state, so a checkpoint resumes on the very next batch. Each of `world_size` ranks takes every
    `world_size`-th window of the epoch's order, so one epoch visits each window once in total.
    `tokens` may be the token cache's compact ids minus one: `id_offset=1` adds the one back.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        starts: Windows | torch.Tensor,
        sequence_length: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        id_offset: int = 0,
    ):
        self.windows = tokens.unfold(0, sequence_length + 1, 1)  # (N, T+1) view, no copy
        self.starts = starts if isinstance(starts, Windows) else Windows(table=starts)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.id_offset = id_offset
        self.epoch, self.position, self._resuming = -1, 0, False
        self._next_epoch: int | None = None
        # Lightning treats it like a DataLoader without a batch sampler: it calls `sampler.set_epoch(epoch)`
        self.sampler, self.batch_sampler = self, None

    def __len__(self) -> int:
        return math.ceil(len(self.starts) // self.world_size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Name the epoch (and so the shuffle) of the next pass, as for a DistributedSampler. A pass resumed
        from a checkpoint goes on only if the checkpoint is of this epoch; otherwise that epoch had ended."""
        if self._resuming and epoch != self.epoch:
            self._resuming = False
        self._next_epoch = epoch

    def __iter__(self):
        if not self._resuming:
            self.epoch = self.epoch + 1 if self._next_epoch is None else self._next_epoch
            self.position, self._next_epoch = 0, None
        self._resuming = False
        B, per_rank = self.batch_size, len(self.starts) // self.world_size  # equal shares keep DDP ranks in step
        order = permutation(len(self.starts), self.seed + self.epoch) if self.shuffle else None
        ahead, block = max(1, LOOKAHEAD // B), None  # batches whose starts are computed together; the first of them
        while self.position < len(self):
            if block is None or not block <= self.position < block + ahead:
                block = self.position
                index = torch.arange(block * B, min((block + ahead) * B, per_rank)) * self.world_size + self.rank
                starts = self.starts[index if order is None else order(index)]
            batch = starts[(self.position - block) * B : (self.position - block + 1) * B]
            self.position += 1
            window = self.windows.index_select(0, batch).long()  # (B, T+1); 4x faster than indexing the unfold view
            if self.id_offset:
                window += self.id_offset
            yield window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._resuming = state["epoch"], state["position"], True
