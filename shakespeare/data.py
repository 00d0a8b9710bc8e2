"""The corpus (fetched once, verified) and the sliding character windows the models learn from."""

from __future__ import annotations

import hashlib
import math
import os
import urllib.request
from pathlib import Path

import lightning as L
import torch

from shakespeare.errors import UsageError
from shakespeare.tokenizer import CharTokenizer

CORPUS_ENV = "SHAKESPEARE_CORPUS"
SPLITS = ("contiguous", "random_windows")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_corpus(url: str, sha256: str, cache_dir: str | Path) -> Path:
    """Return a verified local copy of the corpus: $SHAKESPEARE_CORPUS, the cache, or a fresh download."""
    if os.environ.get(CORPUS_ENV):
        local = Path(os.environ[CORPUS_ENV]).expanduser()
        if not local.is_file():
            raise UsageError(
                f"{CORPUS_ENV} points at {str(local)!r}, which is not a file. Point it at a copy of the "
                f"corpus, or unset it to download the corpus from {url}."
            )
        return local
    cached = Path(cache_dir).expanduser() / Path(url).name.replace("input.txt", "tinyshakespeare.txt")
    if cached.is_file() and sha256_of(cached) == sha256:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            out.write(response.read())
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UsageError(
            f"Could not download the corpus from {url} ({err}). If you are offline, put a copy of it at "
            f"{cached}, or set {CORPUS_ENV}=/path/to/tinyshakespeare.txt, or train on any UTF-8 text "
            f"file with data.path=/path/to/file.txt."
        ) from None
    if (got := sha256_of(partial)) != sha256:
        partial.unlink()
        raise UsageError(
            f"The file downloaded from {url} has SHA-256 {got}, not the expected {sha256}: it was not "
            f"kept. Check data.url, or put a verified copy at {cached}."
        )
    partial.replace(cached)  # atomic: the cache never holds a half-written corpus
    return cached


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, refusing missing, empty and binary files with a clear message."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"data.path={str(path)!r} does not exist or is not a file. Pass an existing UTF-8 text file.")
    raw = path.read_bytes()
    if not raw.strip():
        raise UsageError(f"data.path={str(path)!r} is empty. Pass a UTF-8 text file with some text in it.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"data.path={str(path)!r} is not UTF-8 text (byte {err.start} cannot be decoded). "
            "Convert it to UTF-8 or pass a text file."
        ) from None
    if "\x00" in text:
        raise UsageError(f"data.path={str(path)!r} looks binary (it contains NUL bytes). Pass a text file.")
    return text


class SlidingWindows:
    """Batches of windows x = text[i:i+T], y = text[i+1:i+T+1], assembled by tensor indexing.

    It is an iterable Lightning feeds straight to the model. Its position within an epoch is part of
    its state, so a checkpoint resumes on the very next batch. Each of `world_size` ranks takes every
    `world_size`-th window of the epoch's order, so one epoch visits each window once in total.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        starts: torch.Tensor,
        sequence_length: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.windows = tokens.unfold(0, sequence_length + 1, 1)  # (N, T+1) view, no copy
        self.starts = starts
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position, self._resuming = -1, 0, False
        self._next_epoch: int | None = None
        # Lightning treats it like a DataLoader without a batch sampler: it calls `sampler.set_epoch(epoch)`
        self.sampler, self.batch_sampler = self, None

    def __len__(self) -> int:
        return math.ceil(len(self.starts) // self.world_size / self.batch_size)

    def _order(self) -> torch.Tensor:
        order = self.starts
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = order[torch.randperm(len(order), generator=generator)]
        per_rank = len(order) // self.world_size  # equal shares keep DDP ranks in step
        return order[self.rank :: self.world_size][:per_rank]

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
        order = self._order()
        while self.position < len(self):
            starts = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1
            window = self.windows.index_select(0, starts)  # (B, T+1); 4x faster than indexing the unfold view
            yield window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._resuming = state["epoch"], state["position"], True


class ShakespeareDataModule(L.LightningDataModule):
    """Serves sliding character windows of a text file (tinyshakespeare unless `path` is given)."""

    def __init__(
        self,
        path: str | None = None,
        url: str = "",
        sha256: str = "",
        cache_dir: str = "~/.cache/shakespeare",
        sequence_length: int = 8,
        batch_size: int = 1024,
        stride: int = 1,
        val_stride: int | None = None,
        split: str = "contiguous",
        val_fraction: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        if split not in SPLITS:
            raise UsageError(f"data.split={split!r} is not a split; choose one of {', '.join(SPLITS)}.")
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
        self.save_hyperparameters(logger=False)  # the run logs its curated hyperparameters itself
        self.tokens: torch.Tensor | None = None
        self._tokenizer: CharTokenizer | None = None

    def corpus_path(self) -> Path:
        if self.hparams.path:
            return Path(self.hparams.path).expanduser()
        return fetch_corpus(self.hparams.url, self.hparams.sha256, self.hparams.cache_dir)

    def prepare_data(self) -> None:
        self.corpus_path()  # downloads once, on one process

    @property
    def tokenizer(self) -> CharTokenizer:
        self.setup()
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.tokens is not None:
            return
        path = self.corpus_path()
        text = read_text(path)
        self._tokenizer = CharTokenizer.from_text(text)
        self.tokens = self._tokenizer.encode(text)
        self.train_starts, self.val_starts = self._split(len(self.tokens), path)

    def _split(self, n: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        T, stride, fraction = self.hparams.sequence_length, self.hparams.stride, self.hparams.val_fraction
        if self.hparams.split == "random_windows":  # the log's way: validation windows overlap training ones
            starts = torch.arange(0, max(n - T, 0), stride)
            starts = starts[torch.randperm(len(starts), generator=torch.Generator().manual_seed(self.hparams.seed))]
            cut = len(starts) - int(len(starts) * fraction)
            train, val = starts[:cut], starts[cut:]
        else:  # held out: the last `fraction` of the text
            cut = n - int(n * fraction)
            val_stride = self.hparams.val_stride or stride  # = T: every held-out character predicted once, T x cheaper
            train, val = torch.arange(0, max(cut - T, 0), stride), torch.arange(cut, max(n - T, cut), val_stride)
        if len(train) == 0 or len(val) == 0:
            raise UsageError(
                f"data.sequence_length={T} is too long for {str(path)!r}: its {n} characters leave "
                f"{len(train)} training and {len(val)} validation windows (the validation split holds "
                f"{int(n * fraction)} characters). Use a shorter data.sequence_length or a longer text."
            )
        return train, val

    def _windows(self, starts: torch.Tensor, shuffle: bool) -> SlidingWindows:
        trainer = self.trainer
        return SlidingWindows(
            self.tokens,
            starts,
            self.hparams.sequence_length,
            self.hparams.batch_size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )

    def train_dataloader(self) -> SlidingWindows:
        return self._windows(self.train_starts, shuffle=True)

    def val_dataloader(self) -> SlidingWindows:
        return self._windows(self.val_starts, shuffle=False)
