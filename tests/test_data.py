"""Tokenizers, the sliding windows, the splits and the data module over the token cache are exact."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch

import shakespeare.cli.train as cli
from shakespeare.data import windows
from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.data.windows import FeistelPermutation, SlidingWindows
from shakespeare.errors import UsageError
from shakespeare.tokenizer import (
    BYTE_VOCABULARY,
    PAD,
    ByteTokenizer,
    CharTokenizer,
    tokenizer_for,
)
from tests.harness import REAL_CORPUS, WITHOUT_CORPUS


def test_tokenizer_round_trips_and_puts_pad_first():
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tok = CharTokenizer.from_text(text)
    assert tok.vocabulary[0] == PAD and tok.vocabulary[1:] == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0, *tok.encode("hear").tolist(), 0]) == "hear"


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    assert tok.unknown("abzcy") == ["z", "y"]
    with pytest.raises(KeyError, match="zy"):
        tok.encode("abzcy")


def test_byte_tokenizer_knows_every_text_and_decodes_what_is_not_utf8():
    tok = tokenizer_for(list(BYTE_VOCABULARY))
    assert isinstance(tok, ByteTokenizer) and len(tok) == 257 and tok.pad_id == 0
    assert tok.unknown("Ω ☃ any text") == [] and tok.decode(tok.encode("Ω ☃")) == "Ω ☃"
    assert tok.encode("A").tolist() == [ord("A") + 1]
    assert tok.decode([0, 0xFF + 1, ord("a") + 1]) == "\ufffda"  # a lone 0xFF byte cannot be text
    snowman = tok.encode("☃").tolist()  # three bytes: text appears once the character is whole
    decode = tok.stream_decoder()
    assert [decode(i) for i in snowman] == ["", "", "☃"] and decode.flush() == ""
    decode = tok.stream_decoder()
    assert decode(snowman[0]) == "" and decode.flush() == "\ufffd"  # an unfinished character at the end
    assert isinstance(tokenizer_for([PAD, "a", "b"]), CharTokenizer)


@pytest.mark.skipif(REAL_CORPUS is None, reason=WITHOUT_CORPUS)
def test_tinyshakespeare_has_the_logs_66_ids(tmp_path):
    assert len(ShakespeareDataModule(path=str(REAL_CORPUS), cache_dir=str(tmp_path)).tokenizer) == 66


@pytest.fixture(params=["table", "feistel"])
def shuffle_kind(request, monkeypatch):
    """Each shuffle test runs with randperm's table (small texts) and with the Feistel permutation (big ones)."""
    if request.param == "feistel":
        monkeypatch.setattr(windows, "TABLE_LIMIT", 0)
    return request.param


def test_windows_are_shifted_by_one(shuffle_kind):
    tokens = torch.arange(100)
    windows = SlidingWindows(tokens, torch.arange(0, 92), sequence_length=8, batch_size=16, shuffle=True, seed=3)
    seen = []
    for x, y in windows:
        assert x.shape[1] == 8 and torch.equal(y, x + 1)
        seen += x[:, 0].tolist()
    assert sorted(seen) == list(range(92))  # every window exactly once per epoch
    assert len(windows) == 6


def test_shuffle_changes_each_epoch_but_is_seeded(shuffle_kind):
    def first_batches(seed):
        w = SlidingWindows(torch.arange(1000), torch.arange(990), 8, 32, shuffle=True, seed=seed)
        return [next(iter(w))[0][:, 0].tolist() for _ in range(2)]

    a, b = first_batches(0)
    assert a != b and first_batches(0) == [a, b] and first_batches(1) != [a, b]


def test_ranks_share_an_epoch_without_overlap(shuffle_kind):
    shards = [
        torch.cat([x[:, 0] for x, _ in SlidingWindows(torch.arange(200), torch.arange(190), 8, 10, True, 0, r, 2)])
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 95
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_feistel_permutation_is_a_seeded_bijection(n):
    index = torch.arange(n)
    order = FeistelPermutation(n, seed=7)(index)
    assert sorted(order.tolist()) == list(range(n))
    assert torch.equal(FeistelPermutation(n, seed=7)(index), order)
    if n >= 16:
        assert not torch.equal(FeistelPermutation(n, seed=8)(index), order) and not torch.equal(order, index)


def test_feistel_permutation_of_a_huge_range_needs_no_table():
    n = 10**12 + 7  # windows of a terabyte: a table would take 8 TB
    order = FeistelPermutation(n, seed=0)(torch.arange(10_000))
    assert len(set(order.tolist())) == 10_000 and int(order.min()) >= 0 and int(order.max()) < n
    assert float(order.double().mean()) == pytest.approx(n / 2, rel=0.05)  # spread over the whole range


def datamodule(path: Path, **kwargs) -> ShakespeareDataModule:
    dm = ShakespeareDataModule(path=str(path), cache_dir=str(Path(path).parent / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def test_tokens_are_memory_mapped_bytes_with_the_pad_left_out(corpus):
    dm = datamodule(corpus)
    assert dm.cache.tokens.dtype == torch.uint8 and dm.cache.path.parent.parent == corpus.parent / "cache"
    text = corpus.read_text()
    assert dm.tokenizer.vocabulary == CharTokenizer.from_text(text).vocabulary
    assert torch.equal(dm.cache.ids(), CharTokenizer.from_text(text).encode(text))  # the stored id - 1, plus 1


def test_contiguous_split_holds_out_the_last_tenth(corpus):
    dm = datamodule(corpus, sequence_length=8, batch_size=64)
    n = len(dm.cache.tokens)
    cut = n - n // 10
    assert dm.train_windows.all().tolist() == list(range(cut - 8))  # the last window ends exactly at the cut
    assert dm.val_windows.all().tolist() == list(range(cut, n - 8))
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x[0], dm.cache.ids(cut, cut + 8)) and torch.equal(y[0], dm.cache.ids(cut + 1, cut + 9))


def test_random_windows_split_is_the_logs(corpus):
    dm = datamodule(corpus, sequence_length=8, split="random_windows", seed=1)
    starts = torch.cat([dm.train_windows.all(), dm.val_windows.all()])
    n = len(dm.cache.tokens)
    assert sorted(starts.tolist()) == list(range(n - 8))
    assert abs(len(dm.val_windows) / len(starts) - 0.1) < 0.001
    assert dm.val_windows.all().max() > n * 0.5  # spread over the text, not its tail


def test_stride_skips_windows(corpus):
    assert datamodule(corpus, stride=4).train_windows.all()[:3].tolist() == [0, 4, 8]


def test_test_split_is_the_texts_end_after_validation(corpus):
    dm = datamodule(corpus, sequence_length=8, val_fraction=0.1, test_fraction=0.05, val_stride=8)
    n = len(dm.cache.tokens)
    test_cut = n - int(n * 0.05)
    val_cut = test_cut - int(n * 0.1)
    assert dm.train_windows.all().tolist() == list(range(val_cut - 8))
    assert dm.val_windows.all().tolist() == list(range(val_cut, test_cut - 8, 8))
    assert dm.test_windows.all().tolist() == list(range(test_cut, n - 8, 8))  # each test character once
    x, _ = next(iter(dm.test_dataloader()))
    assert torch.equal(x[0], dm.cache.ids(test_cut, test_cut + 8))
    with pytest.raises(UsageError, match="set data.test_fraction"):
        datamodule(corpus).test_dataloader()


def test_a_folder_of_texts_is_read_in_order_and_no_window_spans_two_files(tmp_path):
    folder = tmp_path / "books"
    (folder / "vol2").mkdir(parents=True)
    (folder / "b.txt").write_text("ab" * 300)
    (folder / "a.txt").write_text("cd" * 200)
    (folder / "vol2" / "c.txt").write_text("ef" * 250)
    (folder / "notes.md").write_text("xyz" * 100)  # not a .txt: not read
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "d.txt").write_text("gh" * 100)
    dm = ShakespeareDataModule(path=str(folder), cache_dir=str(tmp_path / "cache"), sequence_length=8, batch_size=16)
    dm.setup()
    assert dm.cache.lengths == [400, 600, 500] and dm.tokenizer.decode(dm.cache.ids(0, 4)) == "cdcd"
    assert dm.tokenizer.vocabulary == [PAD, *"abcdef"]
    windows = [
        dm.tokenizer.decode(torch.cat([x, y[:, -1:]], 1)[i]) for x, y in dm.train_dataloader() for i in range(len(x))
    ]
    assert len(windows) == len(dm.train_windows) == (400 - 8) + (600 - 8) + (1500 - 150 - 1000 - 8)
    assert all(
        len(set(w) & set("ab")) in (0, len(set(w))) and len(set(w) & set("cd")) in (0, len(set(w))) for w in windows
    )
    markdown = ShakespeareDataModule(path=str(folder / "*.md"), cache_dir=str(tmp_path / "cache"))
    assert markdown.tokenizer.vocabulary == [PAD, "x", "y", "z"]


@pytest.mark.parametrize(
    "pattern, message",
    [("empty", "is a folder without text files.*data.path='.*empty/\\*.md'"), ("empty/*.txt", "matches no files")],
)
def test_a_folder_or_glob_without_texts_is_named(tmp_path, pattern, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("not a .txt")
    with pytest.raises(UsageError, match=message):
        ShakespeareDataModule(path=str(tmp_path / pattern), cache_dir=str(tmp_path)).setup()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b" \n\t", "is empty"),
        (b"\xff\xfe\x00bad", r"not UTF-8 text \(byte 0"),
        (b"ab\x00cd", "looks binary"),
    ],
)
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        datamodule(path)
    assert str(path) in str(err.value)


def test_text_too_short_for_one_window(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be")
    with pytest.raises(UsageError, match="data.sequence_length=64 is too long"):
        datamodule(tmp_path / "short.txt", sequence_length=64)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"split": "shuffled"}, "data.split"),
        ({"unit": "word"}, "data.unit='word'"),
        ({"test_fraction": 0.9}, "data.test_fraction=0.9"),
        ({"test_fraction": -0.1}, "data.test_fraction=-0.1"),
    ],
)
def test_bad_data_values_are_named(corpus, kwargs, key):
    with pytest.raises(UsageError, match=key):
        ShakespeareDataModule(path=str(corpus), **kwargs)


def test_val_stride_spaces_the_held_out_windows(corpus):
    dm = datamodule(corpus, sequence_length=16, val_stride=16)
    assert (dm.val_windows.all().diff() == 16).all() and (dm.train_windows.all().diff() == 1).all()
    with pytest.raises(UsageError, match="data.val_stride=16 needs data.split=contiguous"):
        ShakespeareDataModule(path=str(corpus), val_stride=16, split="random_windows")
    with pytest.raises(UsageError, match="data.val_stride=0"):
        ShakespeareDataModule(path=str(corpus), val_stride=0)


def test_byte_unit_trains_on_any_file(tmp_path):
    path = tmp_path / "mixed.bin"
    raw = "héllo wörld ".encode() * 50 + b"\xff\xfe\x00" * 20  # not UTF-8, NUL bytes: fine as bytes
    path.write_bytes(raw)
    dm = datamodule(path, unit="byte")
    assert dm.tokenizer.vocabulary == BYTE_VOCABULARY and dm.cache.tokens.dtype == torch.uint8
    assert dm.cache.path.read_bytes() == raw  # id - 1 is the byte itself
    x, y = next(iter(dm.val_dataloader()))
    starts = [i for i, b in enumerate(raw) if b & 0xC0 != 0x80]  # where each character begins: its lead byte
    cut = starts[len(starts) - len(starts) // 10]  # the last tenth of the characters, not of the bytes
    assert dm.cache.characters == len(starts) < len(raw) and dm.cuts == (cut, len(raw))
    assert torch.equal(x[0], torch.tensor(list(raw[cut : cut + 8])) + 1) and int(x.max()) == 0xFF + 1


def test_pickling_leaves_the_tokens_behind(corpus):
    dm = datamodule(corpus)  # ddp_spawn pickles the data module into each process: each maps the cache itself
    clone = pickle.loads(pickle.dumps(dm))
    assert len(pickle.dumps(dm)) < len(corpus.read_bytes()) and clone.cache is None
    clone.setup()
    assert torch.equal(clone.cache.tokens, dm.cache.tokens) and len(clone.train_windows) == len(dm.train_windows)


class TrainerAt:
    """What the context schedule reads of a trainer: whether it trains, its step and budget, and no Timer."""

    def __init__(self, step: int, total_steps: int, training: bool = True):
        self.training, self.global_step, self.estimated_stepping_batches = training, step, total_steps
        self.callbacks = []


def test_the_context_schedule_reads_each_window_in_short_pieces_until_its_share_of_the_budget(corpus):
    dm = datamodule(corpus, sequence_length=16, batch_size=3, short_context=4, short_context_until=0.25)
    x, y = next(iter(dm.train_dataloader()))
    dm.trainer = TrainerAt(step=24, total_steps=100)  # under a quarter spent: pieces of 4
    short_x, short_y = dm.on_after_batch_transfer((x, y), 0)
    assert short_x.shape == short_y.shape == (12, 4)
    assert torch.equal(short_x[4:8].flatten(), x[1]) and torch.equal(short_y[4:8].flatten(), y[1])  # in order
    dm.trainer = TrainerAt(step=25, total_steps=100)  # a quarter spent: whole windows from here on
    assert dm.on_after_batch_transfer((x, y), 0)[0].shape == (3, 16)
    validating = datamodule(corpus, sequence_length=16, batch_size=3, short_context=4)
    validating.trainer = TrainerAt(step=0, total_steps=100, training=False)
    assert validating.on_after_batch_transfer((x, y), 0)[0].shape == (3, 16)  # validation reads whole windows
    dm.setup("fit")  # a second fit, with twice the budget: a fifth of it spent is under a quarter again
    dm.trainer = TrainerAt(step=40, total_steps=200)
    assert dm.on_after_batch_transfer((x, y), 0)[0].shape == (12, 4)


class BatchShapes(L.Callback):
    """The shape of each training batch's inputs as the model receives them."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        self.shapes.append(tuple(batch[0].shape))


def test_a_run_reads_short_windows_for_its_share_of_the_steps_then_whole_ones(tiny_cfg, monkeypatch):
    shapes, build = BatchShapes(), cli.build_callbacks
    monkeypatch.setattr(cli, "build_callbacks", lambda cfg: [*build(cfg), shapes])
    schedule = ["data.sequence_length=16", "data.batch_size=4", "data.short_context=8", "data.short_context_until=0.5"]
    cli.fit(tiny_cfg(*schedule, "trainer.limit_train_batches=6"))
    assert shapes.shapes == [(8, 8)] * 3 + [(4, 16)] * 3  # steps 0-2 of 6 spent under half the budget


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"short_context": 5}, r"data.short_context=5 must split data.sequence_length=16 .* \[1, 2, 4, 8\]"),
        ({"short_context": 16}, "data.short_context=16 must split"),
        ({"short_context": 0}, "data.short_context=0"),
        ({"short_context": 8, "short_context_until": 0}, "data.short_context_until=0"),
    ],
)
def test_a_context_schedule_that_cannot_split_the_windows_is_named(corpus, kwargs, message):
    with pytest.raises(UsageError, match=message):
        ShakespeareDataModule(path=str(corpus), sequence_length=16, **kwargs)
