"""The LightningDataModule: a text's token cache split into training, validation and test windows."""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

import lightning as L
import torch

from shakespeare.budget import budget_spent, budget_timer
from shakespeare.data.text import SplitText
from shakespeare.data.token_cache import TokenCache
from shakespeare.data.windows import SlidingWindows, Windows
from shakespeare.errors import UsageError
from shakespeare.ranges import AT_LEAST_1, TORCH_SEED, Range, check_arguments
from shakespeare.tokenizer import MIN_BPE_VOCABULARY, UNITS, Tokenizer

SPLITS = ("contiguous", "random_windows")
VOCABULARY_SIZE = Range(
    MIN_BPE_VOCABULARY, means="the 256 byte values and <|pad|>, plus one token per merge; data.unit=bpe only"
)


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
        unit: Literal[UNITS] = "char",
        vocab_size: Annotated[int, VOCABULARY_SIZE] | None = None,  # a BPE's tokens, pad and bytes included
        cache_dir: str = "~/.cache/shakespeare",
        sequence_length: Annotated[int, AT_LEAST_1] = 8,
        batch_size: Annotated[int, AT_LEAST_1] = 1024,
        stride: Annotated[int, AT_LEAST_1] = 1,
        val_stride: Annotated[int, AT_LEAST_1] | None = None,
        # the context schedule: training reads windows of short_context tokens until short_context_until of the
        # budget is spent, then whole ones (None: whole windows throughout)
        short_context: Annotated[int, AT_LEAST_1] | None = None,
        short_context_until: Annotated[float, Range(0, 1, low_open=True)] = 0.5,
        split: Literal[SPLITS] = "contiguous",
        val_fraction: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.1,
        test_fraction: Annotated[float, Range(0, 1, high_open=True)] | None = None,
        seed: Annotated[int, TORCH_SEED] = 0,  # the random_windows split's, and each epoch's shuffle (seed + epoch)
    ):
        super().__init__()
        if split not in SPLITS:
            raise UsageError(f"data.split={split!r} is not a split; choose one of {', '.join(SPLITS)}.")
        if unit not in UNITS:
            raise UsageError(
                f"data.unit={unit!r} is not a unit; choose char (the text's characters), byte (its bytes) or bpe "
                "(byte-level BPE tokens, with data.vocab_size)."
            )
        check_arguments(ShakespeareDataModule, locals(), "data")
        check_vocab_size(unit, vocab_size)
        if val_stride is not None and split != "contiguous":
            raise UsageError(
                f"data.val_stride={val_stride} needs data.split=contiguous: the {split} split draws its validation "
                "windows from the training windows' grid. Drop data.val_stride or use data.split=contiguous."
            )
        if short_context is not None and (short_context >= sequence_length or sequence_length % short_context):
            divisors = [d for d in range(1, sequence_length) if sequence_length % d == 0]
            raise UsageError(
                f"data.short_context={short_context} must split data.sequence_length={sequence_length} into whole "
                f"shorter windows: pick one of {divisors[-6:]} (e.g. data.short_context={sequence_length // 2}), "
                "or null to train on whole windows throughout."
            )
        if test_fraction is not None and val_fraction + test_fraction >= 1:
            raise UsageError(
                f"data.test_fraction={test_fraction!r} leaves no text to train on beside data.val_fraction="
                f"{val_fraction}: their sum must be below 1, e.g. data.test_fraction=0.05; null: no test split."
            )
        self.save_hyperparameters(logger=False)  # the run logs its curated hyperparameters itself
        self.text = SplitText(
            path, url, sha256, file, archive_sha256, unit, vocab_size, cache_dir, split, val_fraction, test_fraction
        )
        self.train_windows = self.val_windows = self.test_windows = None
        self._total_steps: float | None = None  # the fit's step budget, once the context schedule asks

    @property
    def cache(self) -> TokenCache | None:
        return self.text.cache

    @property
    def tokenizer(self) -> Tokenizer:
        self.setup()
        return self.text.tokenizer

    @property
    def cuts(self) -> tuple[int, int] | None:
        """(val_cut, test_cut): the tokens where validation and test begin."""
        return self.text.cuts

    @property
    def character_cuts(self) -> tuple[int, int] | None:
        """The same places in characters, whatever the unit."""
        return self.text.character_cuts

    @property
    def has_test_split(self) -> bool:
        return self.text.has_test_split

    def prepare_data(self) -> None:
        if self.text.cache is None:
            self.text.load_tokens()  # downloads and encodes once, on one process per machine

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            self._total_steps = None  # each fit's own budget, read at its first training batch
        if self.train_windows is not None:
            return
        self.text.setup()
        self.train_windows, self.val_windows, self.test_windows = self._split()

    def _split(self) -> tuple[Windows, Windows, Windows | None]:
        """Training, validation and test windows: the text's last `test_fraction` of characters is the test split,
        the `val_fraction` before it validation (or, split=random_windows, a random tenth of the other windows). The
        text is cut at characters whatever the unit (at the token holding each cut's first byte), so char, byte and
        BPE runs hold out the same text; a text of single-byte characters is cut where it always was."""
        hp, T = self.hparams, self.hparams.sequence_length
        bounds = [0, *itertools.accumulate(self.cache.lengths)]
        n, characters, (val_cut, test_cut) = bounds[-1], self.cache.characters, self.cuts
        test_chars, val_chars = characters - self.character_cuts[1], self.character_cuts[1] - self.character_cuts[0]
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
            tokens = "" if hp.unit == "char" else f" ({n} {hp.unit} tokens)"
            raise UsageError(
                f"data.sequence_length={T} is too long for {str(source)!r}: its {characters} characters{tokens} leave "
                f"{len(train)} training and {len(val)} validation windows{tested} (the validation split holds "
                f"{val_chars} characters). Use a shorter data.sequence_length or a longer text."
            )
        return train, val, test

    def __getstate__(self) -> dict:
        """Pickled (e.g. for ddp_spawn's processes) without its tokens: each process maps the cache itself."""
        return {**self.__dict__, "train_windows": None, "val_windows": None, "test_windows": None}

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
                + (
                    "trainer=ddp trainer.devices=... with trainer.devices x trainer.num_nodes = "
                    f"{saved} (or torchrun with {saved} processes in all)."
                    if saved > 1
                    else "without trainer=ddp."
                )
            )

    def on_after_batch_transfer(
        self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context schedule: until `short_context_until` of the budget is spent, each training window is read
        as sequence_length / short_context consecutive windows of short_context tokens. A step holds the same
        tokens with cheaper attention, so most of the budget buys more steps; the rest trains on whole windows, the
        context the model validates and generates with. Validation always reads whole windows."""
        trainer, short = self.trainer, self.hparams.get("short_context")
        if short is None or trainer is None or not trainer.training:
            return batch
        if self._total_steps is None:
            self._total_steps = float(trainer.estimated_stepping_batches)
        if budget_spent(trainer.global_step, self._total_steps, budget_timer(trainer.callbacks)) >= (
            self.hparams.short_context_until
        ):
            return batch
        x, y = batch  # (B, T) -> (B * T / short, short): window by window, each one's consecutive pieces
        return x.reshape(-1, short), y.reshape(-1, short)

    def train_dataloader(self) -> SlidingWindows:
        return self._windows(self.train_windows, shuffle=True)

    def val_dataloader(self) -> SlidingWindows:
        return self._windows(self.val_windows, shuffle=False)

    def test_dataloader(self) -> SlidingWindows:
        if self.test_windows is None:
            raise UsageError("There is no test split: set data.test_fraction (e.g. 0.05, the text's last 5%) to test.")
        return self._windows(self.test_windows, shuffle=False)


def check_vocab_size(unit: str, vocab_size: int | None) -> None:
    """A BPE needs its size, and only a BPE has one."""
    if unit == "bpe" and vocab_size is None:
        raise UsageError(
            "data.unit=bpe needs data.vocab_size, the size of its vocabulary: at least 257 (the 256 byte values and "
            "<|pad|>) plus one token per merge, e.g. data.vocab_size=512."
        )
    if unit != "bpe" and vocab_size is not None:
        raise UsageError(
            f"data.vocab_size={vocab_size} sizes a BPE vocabulary, but data.unit={unit}, whose vocabulary is the "
            f"text's {'characters' if unit == 'char' else '256 byte values'}. Add data.unit=bpe to train one, or drop "
            "data.vocab_size."
        )
