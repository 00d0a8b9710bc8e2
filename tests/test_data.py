"""Tokenizer, corpus loading and the sliding windows are exact."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from shakespeare.data import CORPUS_ENV, ShakespeareDataModule, SlidingWindows, fetch_corpus, read_text
from shakespeare.errors import UsageError
from shakespeare.tokenizer import PAD, CharTokenizer


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


@pytest.mark.skipif(not os.environ.get(CORPUS_ENV), reason=f"{CORPUS_ENV} not set")
def test_tinyshakespeare_has_the_logs_66_ids():
    assert len(CharTokenizer.from_text(read_text(os.environ[CORPUS_ENV]))) == 66


def test_windows_are_shifted_by_one():
    tokens = torch.arange(100)
    windows = SlidingWindows(tokens, torch.arange(0, 92), sequence_length=8, batch_size=16, shuffle=True, seed=3)
    seen = []
    for x, y in windows:
        assert x.shape[1] == 8 and torch.equal(y, x + 1)
        seen += x[:, 0].tolist()
    assert sorted(seen) == list(range(92))  # every window exactly once per epoch
    assert len(windows) == 6


def test_shuffle_changes_each_epoch_but_is_seeded():
    def first_batches(seed):
        w = SlidingWindows(torch.arange(1000), torch.arange(990), 8, 32, shuffle=True, seed=seed)
        return [next(iter(w))[0][:, 0].tolist() for _ in range(2)]

    a, b = first_batches(0)
    assert a != b and first_batches(0) == [a, b] and first_batches(1) != [a, b]


def test_ranks_share_an_epoch_without_overlap():
    shards = [
        torch.cat([x[:, 0] for x, _ in SlidingWindows(torch.arange(200), torch.arange(190), 8, 10, True, 0, r, 2)])
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 95
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())


def datamodule(path: Path, **kwargs) -> ShakespeareDataModule:
    dm = ShakespeareDataModule(path=str(path), **kwargs)
    dm.setup("fit")
    return dm


def test_contiguous_split_holds_out_the_last_tenth(corpus):
    dm = datamodule(corpus, sequence_length=8, batch_size=64)
    n, cut = len(dm.tokens), len(dm.tokens) - len(dm.tokens) // 10
    assert dm.train_starts.tolist() == list(range(cut - 8))  # the last window ends exactly at the cut
    assert dm.val_starts.tolist() == list(range(cut, n - 8))
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x[0], dm.tokens[cut : cut + 8]) and torch.equal(y[0], dm.tokens[cut + 1 : cut + 9])


def test_random_windows_split_is_the_logs(corpus):
    dm = datamodule(corpus, sequence_length=8, split="random_windows", seed=1)
    starts = torch.cat([dm.train_starts, dm.val_starts])
    assert sorted(starts.tolist()) == list(range(len(dm.tokens) - 8))
    assert abs(len(dm.val_starts) / len(starts) - 0.1) < 0.001
    assert dm.val_starts.max() > len(dm.tokens) * 0.5  # spread over the text, not its tail


def test_stride_skips_windows(corpus):
    assert datamodule(corpus, stride=4).train_starts[:3].tolist() == [0, 4, 8]


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"ab\x00cd", "binary")],
)
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        read_text(path)
    assert str(path) in str(err.value)


def test_text_too_short_for_one_window(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be")
    with pytest.raises(UsageError, match="data.sequence_length=64 is too long"):
        datamodule(tmp_path / "short.txt", sequence_length=64)


@pytest.mark.parametrize("kwargs, key", [({"batch_size": 0}, "data.batch_size=0"), ({"split": "shuffled"}, "data.split")])
def test_bad_data_values_are_named(corpus, kwargs, key):
    with pytest.raises(UsageError, match=key):
        ShakespeareDataModule(path=str(corpus), **kwargs)


def test_download_is_verified_and_cached(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    url, digest = corpus.as_uri(), hashlib.sha256(corpus.read_bytes()).hexdigest()
    cached = fetch_corpus(url, digest, tmp_path / "cache")
    assert cached.read_bytes() == corpus.read_bytes() and cached.parent == tmp_path / "cache"
    corpus.unlink()  # a second call is served from the cache
    assert fetch_corpus(url, digest, tmp_path / "cache") == cached


def test_download_with_wrong_hash_keeps_nothing(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    with pytest.raises(UsageError, match="SHA-256"):
        fetch_corpus(corpus.as_uri(), "0" * 64, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    with pytest.raises(UsageError, match=r"put a copy of it at .*tinyshakespeare.txt.*SHAKESPEARE_CORPUS"):
        fetch_corpus("http://127.0.0.1:9/input.txt", "0" * 64, tmp_path / "cache")


def test_corpus_env_points_at_a_local_copy(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv(CORPUS_ENV, str(corpus))
    assert fetch_corpus("http://127.0.0.1:9/input.txt", "0" * 64, tmp_path) == corpus
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="missing.txt"):
        fetch_corpus("http://127.0.0.1:9/input.txt", "0" * 64, tmp_path)


def test_val_stride_spaces_the_held_out_windows(corpus):
    data = ShakespeareDataModule(path=str(corpus), sequence_length=16, val_stride=16)
    data.setup()
    assert (data.val_starts.diff() == 16).all() and (data.train_starts.diff() == 1).all()
    with pytest.raises(UsageError, match="data.val_stride=16 needs data.split=contiguous"):
        ShakespeareDataModule(path=str(corpus), val_stride=16, split="random_windows")
    with pytest.raises(UsageError, match="data.val_stride=0"):
        ShakespeareDataModule(path=str(corpus), val_stride=0)
