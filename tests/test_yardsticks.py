"""Yardsticks are each compressor's own conditional code length of the held-out split, per character whatever the
unit, measured once and kept beside the token caches; a damaged or stale record is measured again."""

from __future__ import annotations

import bz2
import dataclasses
import json
import lzma
import math
import zlib
from pathlib import Path

import pyppmd
import pytest
import zstandard

from shakespeare.data import yardsticks as module
from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.data.yardsticks import Yardstick, yardsticks
from shakespeare.errors import UsageError

# each compressor as its library's documentation says, independently of the module's table
DIRECT = {
    "gzip -9": lambda data: zlib.compress(data, 9),
    "bzip2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "xz -9e": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
    "zstd -22": lambda data: zstandard.ZstdCompressor(level=22).compress(data),
    "PPMd -o6 -m256": lambda data: pyppmd.compress(data, max_order=6, mem_size=256 << 20, variant="H"),
}
NON_ASCII = "KING HENRY:\nŒuvre naïve, ☃ déjà vu — señor!\n\nJULIET:\nΩ thou art fair, ümlaut and ß.\n\n"


def expected(train: bytes, held_out: bytes, characters: int) -> list[Yardstick]:
    """The yardsticks from each compressor's own output sizes."""
    return [
        Yardstick(name, 8 * (len(compress(train + held_out)) - len(compress(train))), characters)
        for name, compress in DIRECT.items()
    ]


def data(path: Path, **kwargs) -> ShakespeareDataModule:
    return ShakespeareDataModule(path=str(path), cache_dir=str(path.parent / "cache"), **kwargs)


def cuts(n: int, val_fraction: float = 0.1, test_fraction: float = 0.0) -> tuple[int, int]:
    """Where the validation and test splits begin in a text of n tokens, as the data module cuts it."""
    test = int(n * test_fraction)
    return n - test - int(n * val_fraction), n - test


def record_of(datamodule: ShakespeareDataModule) -> Path:
    (record,) = datamodule.cache.path.parent.glob("*.yardsticks-*.json")
    return record


def test_each_yardstick_is_the_compressors_own_conditional_code_length(corpus):
    text = corpus.read_bytes()
    val_cut, _ = cuts(len(text))
    found = yardsticks(data(corpus).text)
    assert found == expected(text[:val_cut], text[val_cut:], len(text) - val_cut)
    assert [y.compressor for y in found] == list(DIRECT)
    for y in found:
        assert y.characters == 2000 and 0 < y.bits_per_char < 8
        assert y.bits_per_char == y.bits / 2000 and y.nats_per_char == pytest.approx(y.bits_per_char * math.log(2))
    gzip, ppmd = found[0], found[-1]
    assert ppmd.bits < gzip.bits  # the play-like text is easy: PPMd beats gzip, as on tinyshakespeare


def test_the_record_beside_the_token_cache_is_used_the_second_time(corpus, monkeypatch):
    first = data(corpus)
    found = yardsticks(first.text)
    record = record_of(first)
    assert record.name.startswith(f"{first.cache.text_key}.yardsticks-val-18000-18000-20000")
    assert json.loads(record.read_text())["versions"] == module.versions()

    def measured_again(data: bytes) -> bytes:
        raise AssertionError("measured again although the record holds the figures")

    failing = [dataclasses.replace(c, compress=measured_again) for c in module.COMPRESSORS]  # same names, versions
    monkeypatch.setattr(module, "COMPRESSORS", tuple(failing))
    assert yardsticks(data(corpus).text) == found
    assert not list(record.parent.glob("*.part"))


@pytest.mark.parametrize(
    "damage",
    ["cut short", "not an object", "a field missing", "another version", "another split", "bits not a number"],
)
def test_a_damaged_or_stale_record_is_measured_again(corpus, damage):
    datamodule = data(corpus)
    found = yardsticks(datamodule.text)
    record = record_of(datamodule)
    kept = json.loads(record.read_text())
    if damage == "cut short":
        record.write_text(record.read_text()[:50])
    elif damage == "not an object":
        record.write_text("[1, 2]")
    else:
        changed = json.loads(record.read_text())
        if damage == "a field missing":
            del changed["yardsticks"][2]["bits"]
        elif damage == "another version":
            changed["versions"]["zstd -22"] = "zstandard 0.1"
        elif damage == "another split":
            changed["ranges"] = [100, 100, 200]
        else:
            changed["yardsticks"][0]["bits"] = "12"
        record.write_text(json.dumps(changed))
    assert yardsticks(data(corpus).text) == found
    assert json.loads(record.read_text()) == kept  # written again, whole


@pytest.mark.parametrize("unit, vocab_size", [("char", None), ("byte", None), ("bpe", 300)])
def test_a_non_ascii_text_is_cut_and_counted_in_characters_whatever_the_unit(tmp_path, unit, vocab_size):
    path = tmp_path / "accents.txt"
    text = NON_ASCII * 40
    path.write_text(text, encoding="utf-8")
    assert len(text.encode("utf-8")) > len(text)  # characters and bytes differ
    val_cut, _ = cuts(len(text))
    held_out = text[val_cut:]
    datamodule = data(path, unit=unit, vocab_size=vocab_size)
    found = yardsticks(datamodule.text)
    assert found == expected(text[:val_cut].encode(), held_out.encode(), len(held_out))
    others = [data(path, unit=other, vocab_size=size) for other, size in (("char", None), ("byte", None))]
    assert all(yardsticks(other.text) == found for other in others)  # one text, one record, whatever the unit
    assert len(list(datamodule.cache.path.parent.glob("*.yardsticks-*.json"))) == 1


def test_the_test_split_is_conditioned_on_the_training_text_alone(corpus):
    text = corpus.read_bytes()
    val_cut, test_cut = cuts(len(text), 0.1, 0.05)
    datamodule = data(corpus, test_fraction=0.05)
    assert datamodule.setup() is None and datamodule.cuts == (val_cut, test_cut)
    assert yardsticks(datamodule.text, "test") == expected(text[:val_cut], text[test_cut:], len(text) - test_cut)
    assert yardsticks(datamodule.text) == expected(text[:val_cut], text[val_cut:test_cut], test_cut - val_cut)
    assert len(list(datamodule.cache.path.parent.glob("*.yardsticks-*.json"))) == 2  # one record per split


def test_random_windows_hold_out_no_validation_text_but_their_test_split_has_yardsticks(corpus):
    text = corpus.read_bytes()
    datamodule = data(corpus, split="random_windows", test_fraction=0.05)
    assert yardsticks(datamodule.text) == []
    assert not list(datamodule.cache.path.parent.glob("*.yardsticks-*"))  # nothing measured, nothing kept
    _, test_cut = cuts(len(text), 0.1, 0.05)  # its training windows span all the text before the test split
    assert yardsticks(datamodule.text, "test") == expected(text[:test_cut], text[test_cut:], len(text) - test_cut)


def test_a_run_without_a_test_split_or_another_split_name_is_refused(corpus):
    with pytest.raises(UsageError, match=r"no test split .*data.test_fraction=None.* data.test_fraction set"):
        yardsticks(data(corpus).text, "test")
    with pytest.raises(UsageError, match=r"split='train' is not a held-out split: .* val or test"):
        yardsticks(data(corpus).text, "train")
