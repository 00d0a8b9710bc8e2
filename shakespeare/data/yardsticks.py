"""Yardsticks: what standard compressors need for a run's held-out text once they have read its training text,
so that a model's held-out loss reads as "worse than gzip" or "better than xz".

A compressor's yardstick is the held-out text's code length conditioned on the training text: what its output
grows by when the held-out text follows the training text, bits = 8 * (len(compress(train + held_out)) -
len(compress(train))), given per character of the held-out text in bits and in nats (nats = bits * ln 2), the unit
every run's bits per character share, whatever its tokens (a file read as bytes counts its UTF-8 lead bytes).

The held-out text is the split's own tokens, read back from the token cache (no source file is read again) as the
text's bytes; char, byte and BPE runs cut the text at the same characters, so they share one record.
Both splits are conditioned on the text the run trains on: the text before the validation split; with
data.split=random_windows, whose training and validation windows are drawn from the same text, all the text
before the test split. Such a run holds no validation text out, so its validation split has no yardsticks
(an empty list, not an error: a report of several runs simply shows none for it).

Measured once per text, split and compressor versions, and kept beside the token caches in
`<text key>.yardsticks-<split>-<training end>-<held-out start>-<held-out end>.json` (character positions), with the
libraries' versions: written beside and renamed under a lock, so concurrent runs measure once and never see
half a record. A record that is damaged, or made for another text, split or library version, is measured
again, never trusted. On tinyshakespeare the five take about 3 CPU-seconds; on a 100 MB text, minutes.
"""

from __future__ import annotations

import bz2
import json
import logging
import lzma
import math
import os
import platform
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyppmd
import torch
import zstandard

from shakespeare.data.corpus import cache_lock
from shakespeare.data.text import SplitText
from shakespeare.data.token_cache import TokenCache
from shakespeare.errors import UsageError
from shakespeare.tokenizer import Tokenizer

log = logging.getLogger("shakespeare")

FORMAT = 2  # 2: named by the text (any unit) and its character positions
HELD_OUT = ("val", "test")
CHUNK = 1 << 22  # tokens turned back into text at a time: their ids (8 bytes each) never grow with the text


@dataclass(frozen=True)
class Compressor:
    """A standard compressor at its strongest common setting, named as its command line would be written."""

    name: str
    compress: Callable[[bytes], bytes]
    version: str  # the library doing the work: a record another version made is measured again


@dataclass(frozen=True)
class Yardstick:
    """A compressor's code length for a held-out text of `characters` characters."""

    compressor: str
    bits: int
    characters: int

    @property
    def bits_per_char(self) -> float:
        return self.bits / self.characters

    @property
    def nats_per_char(self) -> float:
        """In the unit of the model's cross-entropy loss."""
        return self.bits_per_char * math.log(2)


PYTHON = f"Python {platform.python_version()}"  # bz2 and lzma do not say which libbz2 and liblzma they link
COMPRESSORS = (
    Compressor("gzip -9", lambda data: zlib.compress(data, 9), f"zlib {zlib.ZLIB_RUNTIME_VERSION}"),
    Compressor("bzip2 -9", lambda data: bz2.compress(data, 9), f"bz2 of {PYTHON}"),
    Compressor(
        "xz -9e",
        lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
        f"lzma of {PYTHON}",
    ),
    Compressor(
        "zstd -22",
        lambda data: zstandard.ZstdCompressor(level=22).compress(data),
        f"zstandard {zstandard.__version__} (zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})",
    ),
    Compressor(  # PPMd variant H (pyppmd's default is I), order 6, 256 MB of model
        "PPMd -o6 -m256",
        lambda data: pyppmd.compress(data, max_order=6, mem_size=256 << 20, variant="H"),
        f"pyppmd {pyppmd.__version__}",
    ),
)


class Stale(Exception):
    """Why a yardsticks record cannot be used as it is."""


def conditional_bits(compress: Callable[[bytes], bytes], train: bytes, held_out: bytes) -> int:
    """The held-out text's code length once the compressor has read the training text: what its output grows
    by, in bits, when the held-out text follows the training text."""
    return 8 * (len(compress(train + held_out)) - len(compress(train)))


def measure(train: bytes, held_out: bytes, characters: int) -> list[Yardstick]:
    """Each compressor's yardstick for `held_out` (`characters` characters long) after `train`."""
    return [Yardstick(c.name, conditional_bits(c.compress, train, held_out), characters) for c in COMPRESSORS]


def held_out_range(text: SplitText, split: str) -> tuple[int, int, int] | None:
    """(training end, held-out start, held-out end) in token positions, the training text starting at 0;
    None for the validation split of data.split=random_windows, whose windows overlap the training ones."""
    check_split(text, split)
    return span(text.split, split, text.cuts, len(text.cache.tokens))


def held_out_characters(text: SplitText, split: str) -> tuple[int, int, int] | None:
    """The same places as `held_out_range`, in characters of the text: the same for every unit."""
    check_split(text, split)
    return span(text.split, split, text.character_cuts, text.cache.characters)


def check_split(text: SplitText, split: str) -> None:
    """Refuse a split that is not held out, or a test split the run has not; reads the text's tokens."""
    if split not in HELD_OUT:
        raise UsageError(f"split={split!r} is not a held-out split: yardsticks measure val or test.")
    text.setup()
    if split == "test" and not text.has_test_split:
        raise UsageError(
            f"This run has no test split to measure (data.test_fraction={text.test_fraction}). Train with "
            "data.test_fraction set (e.g. 0.05, the text's last 5%) to hold one out, or measure the validation split."
        )


def span(kind: str, split: str, cuts: tuple[int, int], end: int) -> tuple[int, int, int] | None:
    """(training end, held-out start, held-out end) of `split` of a data.split=`kind` run, given the splits' `cuts`
    and the text's `end`."""
    val_cut, test_cut = cuts
    if kind == "random_windows":  # its training windows span all the text before the test split
        return None if split == "val" else (test_cut, test_cut, end)
    return (val_cut, val_cut, test_cut) if split == "val" else (val_cut, test_cut, end)


def text_bytes(cache: TokenCache, tokenizer: Tokenizer, start: int, stop: int) -> bytes:
    """Tokens [start, stop) of the cache as the text's bytes: UTF-8 for characters, the bytes themselves for
    byte tokens (id - 1 is the byte), each BPE token's bytes."""
    if tokenizer.unit == "byte":
        decode = byte_text
    elif tokenizer.unit == "bpe":
        table = [tokenizer.token_bytes(i) for i in range(len(tokenizer))]
        decode = lambda ids: b"".join(table[i] for i in ids.tolist())  # noqa: E731
    else:  # each character's code point, then UTF-8 (the pad, id 0, never occurs in a text)
        points = np.array([ord(ch) if len(ch) == 1 else 0 for ch in tokenizer.vocabulary], dtype=np.uint32)
        decode = lambda ids: points[ids.numpy()].tobytes().decode("utf-32-le").encode("utf-8")  # noqa: E731
    return b"".join(decode(cache.ids(at, min(at + CHUNK, stop))) for at in range(start, stop, CHUNK))


def byte_text(ids: torch.Tensor) -> bytes:
    return (ids - 1).to(torch.uint8).numpy().tobytes()


def record_path(cache: TokenCache, split: str, ranges: tuple[int, int, int]) -> Path:
    """The record beside the token caches: named by the text (its own key, whatever the unit), the split and its
    character positions."""
    return cache.path.with_name(f"{cache.text_key}.yardsticks-{split}-{'-'.join(map(str, ranges))}.json")


def versions() -> dict[str, str]:
    return {c.name: c.version for c in COMPRESSORS}


def read_record(path: Path, key: str, ranges: tuple[int, int, int]) -> list[Yardstick]:
    """The yardsticks a record keeps, after checking it is this text's and split's, by these compressors;
    raises Stale saying what is wrong."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Stale("missing") from None
    except (OSError, ValueError):
        raise Stale("unreadable (not JSON)") from None
    try:
        if record["format"] != FORMAT or record["key"] != key or record["ranges"] != list(ranges):
            raise Stale("of another text or split")
        if record["versions"] != versions():
            raise Stale(f"made by other compressors or versions ({record['versions']})")
        found = [Yardstick(y["compressor"], y["bits"], y["characters"]) for y in record["yardsticks"]]
        if [y.compressor for y in found] != list(versions()) or any(
            type(y.bits) is not int or y.characters != ranges[2] - ranges[1] for y in found
        ):
            raise Stale("inconsistent (its figures contradict its record)")
    except (KeyError, TypeError):
        raise Stale("incomplete (it lacks fields)") from None
    return found


def write_record(path: Path, key: str, ranges: tuple[int, int, int], found: list[Yardstick]) -> None:
    """Written beside and renamed: a reader sees the whole record or none. A record that cannot be written
    costs only a measurement next time."""
    record = {
        "format": FORMAT,
        "key": key,
        "ranges": list(ranges),
        "versions": versions(),
        "yardsticks": [{"compressor": y.compressor, "bits": y.bits, "characters": y.characters} for y in found],
    }
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        partial.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        log.warning("Could not keep the yardsticks in %s (%s): they will be measured again.", path, err.strerror)
    finally:
        partial.unlink(missing_ok=True)


def yardsticks(text: SplitText, split: str = "val") -> list[Yardstick]:
    """Each compressor's yardstick for the text's held-out `split` ("val" or "test"), conditioned on
    its training text: read from the record beside the token caches, or measured once and kept there. Empty
    for the validation split of data.split=random_windows, which holds no text out."""
    ranges, tokens = held_out_characters(text, split), held_out_range(text, split)
    if ranges is None:
        return []
    cache, key = text.cache, text.cache.text_key
    path = record_path(cache, split, ranges)
    try:
        return read_record(path, key, ranges)
    except Stale:
        pass
    with cache_lock(path):
        try:  # another process may have measured them while this one waited for the lock
            return read_record(path, key, ranges)
        except Stale as reason:
            if path.exists():
                log.warning("The yardsticks record %s is %s: measuring them again.", path, reason)
        train_end, start, stop = tokens
        log.info("Measuring the %s split's yardsticks (%s) once", split, ", ".join(versions()))
        train, held_out = (text_bytes(cache, text.tokenizer, a, b) for a, b in ((0, train_end), (start, stop)))
        found = measure(train, held_out, ranges[2] - ranges[1])
        write_record(path, key, ranges, found)
    return found
