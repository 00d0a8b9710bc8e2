"""The sliding windows the models learn from, served over a text's memory-mapped token cache.

Memory does not grow with the corpus beyond the mapped tokens: window starts are computed from their
index (never stored one per character), and an epoch's shuffle of more than `TABLE_LIMIT` windows is a
seeded Feistel permutation evaluated batch by batch. Up to `TABLE_LIMIT` windows it is `torch.randperm`'s
table, as it always was, so tinyshakespeare runs draw the very batches (and reach the very losses) they
did before the cache existed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import lightning as L
import torch

from shakespeare.corpus import CORPUS_ENV, fetch_corpus, text_files  # noqa: F401  (CORPUS_ENV: re-exported)
from shakespeare.errors import UsageError
from shakespeare.token_cache import TokenCache, load_tokens
from shakespeare.tokenizer import UNITS, Tokenizer, tokenizer_for

SPLITS = ("contiguous", "random_windows")
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


class ShakespeareDataModule(L.LightningDataModule):
    """Serves sliding windows of a text (tinyshakespeare unless `path` names a file, folder or glob), split
    into training, validation and (with `test_fraction`) test text, from its token cache."""

    def __init__(
        self,
        path: str | None = None,
        url: str = "",
        sha256: str = "",
        file: str | None = None,
        archive_sha256: str | None = None,
        unit: str = "char",
        cache_dir: str = "~/.cache/shakespeare",
        sequence_length: int = 8,
        batch_size: int = 1024,
        stride: int = 1,
        val_stride: int | None = None,
        split: str = "contiguous",
        val_fraction: float = 0.1,
        test_fraction: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if split not in SPLITS:
            raise UsageError(f"data.split={split!r} is not a split; choose one of {', '.join(SPLITS)}.")
        if unit not in UNITS:
            raise UsageError(f"data.unit={unit!r} is not a unit; choose char (the text's characters) or byte (its bytes).")
        for key, value in (("sequence_length", sequence_length), ("batch_size", batch_size), ("stride", stride),
                           ("val_stride", stride if val_stride is None else val_stride)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"data.{key}={value!r} must be a whole number of at least 1.")
        if val_stride is not None and split != "contiguous":
            raise UsageError(
                f"data.val_stride={val_stride} needs data.split=contiguous: the {split} split draws its validation "
                "windows from the training windows' grid. Drop data.val_stride or use data.split=contiguous."
            )
        if not 0 < val_fraction < 1:
            raise UsageError(f"data.val_fraction={val_fraction!r} must lie strictly between 0 and 1, e.g. 0.1.")
        if test_fraction is not None and not (0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UsageError(
                f"data.test_fraction={test_fraction!r} must lie in [0, 1) and leave text to train on beside "
                f"data.val_fraction={val_fraction} (their sum must be below 1), e.g. 0.05; null: no test split."
            )
        self.save_hyperparameters(logger=False)  # the run logs its curated hyperparameters itself
        self.cache: TokenCache | None = None
        self._tokenizer: Tokenizer | None = None
        self.train_windows = self.val_windows = self.test_windows = None

    def load_tokens(self) -> TokenCache:
        """The text's token cache: `data.path`'s files, or the corpus at `data.url`, which is downloaded and
        verified only if its tokens are not cached yet (they are keyed by its published SHA-256)."""
        hp = self.hparams
        if hp.path:
            return load_tokens(text_files(hp.path), hp.unit, hp.cache_dir)
        fetch = lambda: [fetch_corpus(hp.url, hp.sha256, hp.cache_dir, hp.file, hp.archive_sha256)]  # noqa: E731
        return load_tokens(fetch, hp.unit, hp.cache_dir, digests=[hp.sha256])

    def prepare_data(self) -> None:
        if self.cache is None:
            self.load_tokens()  # downloads and encodes once, on one process per machine

    @property
    def tokenizer(self) -> Tokenizer:
        self.setup()
        return self._tokenizer

    @property
    def has_test_split(self) -> bool:
        return bool(self.hparams.test_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        self.cache = self.load_tokens()
        self._tokenizer = tokenizer_for(self.cache.vocabulary)
        self.train_windows, self.val_windows, self.test_windows = self._split(self.cache.lengths)

    def _split(self, lengths: list[int]) -> tuple[Windows, Windows, Windows | None]:
        """Training, validation and test windows: the text's last `test_fraction` is the test split, the
        `val_fraction` before it validation (or, split=random_windows, a random tenth of the other windows)."""
        hp, T = self.hparams, self.hparams.sequence_length
        bounds = [0, *itertools.accumulate(lengths)]
        n = bounds[-1]
        test_chars, val_chars = int(n * (hp.test_fraction or 0)), int(n * hp.val_fraction)
        val_cut, test_cut = n - test_chars - val_chars, n - test_chars
        held_out_stride = hp.val_stride or hp.stride  # = T: every held-out character predicted once, T x cheaper
        if hp.split == "random_windows":  # the log's way: validation windows overlap training ones
            starts = Windows.spanning(bounds, 0, test_cut, T, hp.stride).all()
            starts = starts[torch.randperm(len(starts), generator=torch.Generator().manual_seed(hp.seed))]
            cut = len(starts) - int(len(starts) * hp.val_fraction)
            train, val = Windows(table=starts[:cut]), Windows(table=starts[cut:])
        else:  # held out: the last `val_fraction` of the text before the test split
            train = Windows.spanning(bounds, 0, val_cut, T, hp.stride)
            val = Windows.spanning(bounds, val_cut, test_cut, T, held_out_stride)
        test = Windows.spanning(bounds, test_cut, n, T, held_out_stride) if test_chars else None
        if len(train) == 0 or len(val) == 0 or (hp.test_fraction and not test):
            source = hp.path or hp.file or hp.url
            tested = f" and {len(test or [])} test windows" if hp.test_fraction else ""
            raise UsageError(
                f"data.sequence_length={T} is too long for {str(source)!r}: its {n} characters leave "
                f"{len(train)} training and {len(val)} validation windows{tested} (the validation split holds "
                f"{val_chars} characters). Use a shorter data.sequence_length or a longer text."
            )
        return train, val, test

    def __getstate__(self) -> dict:
        """Pickled (e.g. for ddp_spawn's processes) without its tokens: each process maps the cache itself."""
        state = self.__dict__.copy()
        state.update(cache=None, _tokenizer=None, train_windows=None, val_windows=None, test_windows=None)
        return state

    def _windows(self, starts: Windows, shuffle: bool) -> SlidingWindows:
        trainer = self.trainer
        return SlidingWindows(
            self.cache.tokens,
            starts,
            self.hparams.sequence_length,
            self.hparams.batch_size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            id_offset=1,
        )

    def state_dict(self) -> dict:
        """The number of processes the windows are dealt to, which a checkpoint's data order depends on."""
        return {"world_size": self.trainer.world_size if self.trainer else 1}

    def load_state_dict(self, state: dict) -> None:
        """Refuse to resume on another number of processes: each takes every N-th window with its own
        batch, so the batches and their order would change and the run would no longer be the same one."""
        saved, now = state.get("world_size", 1), self.trainer.world_size if self.trainer else 1
        if saved != now:
            raise UsageError(
                f"ckpt_path: {self.trainer.ckpt_path} was trained on {saved} process{'es' if saved > 1 else ''} and "
                f"this run has {now}. Each process takes every {saved}-th window of the epoch with a batch of "
                f"data.batch_size={self.hparams.batch_size}, so on {now} the batches and the order of the windows "
                f"would change and the run would no longer continue exactly. Resume it on {saved}: "
                + ("trainer=ddp trainer.devices=... with trainer.devices x trainer.num_nodes = "
                   f"{saved} (or torchrun with {saved} processes in all)." if saved > 1 else "without trainer=ddp.")
            )

    def train_dataloader(self) -> SlidingWindows:
        return self._windows(self.train_windows, shuffle=True)

    def val_dataloader(self) -> SlidingWindows:
        return self._windows(self.val_windows, shuffle=False)

    def test_dataloader(self) -> SlidingWindows:
        if self.test_windows is None:
            raise UsageError("There is no test split: set data.test_fraction (e.g. 0.05, the text's last 5%) to test.")
        return self._windows(self.test_windows, shuffle=False)
