"""The token cache: a text encoded once, chunk by chunk, into a compact file of token ids that every later
run and every DDP rank memory-maps, so memory does not grow with the corpus and nothing is re-encoded.

In `<cache_dir>/tokens/`: `<key>.bin` holds each token's id minus one (the pad, id 0, never occurs in a
text): one byte a token when that fits (at most 256 characters, or the 256 byte values), else two (int16),
else four. `<key>.json` is its record: vocabulary, dtype, length, tokens per source file, and the `.bin`'s
checksum. The key hashes the sources' contents and the unit, so an edited text gets a new cache. A record
that does not match its `.bin` (truncated, damaged, another format) is rebuilt, never trusted. Both files
are written beside their target and renamed, under a lock: concurrent runs and ranks encode once and
never see half a file. (No fsync: a file cut short by a crash fails its checksum and is encoded again.)
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shakespeare.data.corpus import cache_lock
from shakespeare.errors import UsageError
from shakespeare.tokenizer import BYTE_VOCABULARY, PAD, UNITS

log = logging.getLogger("shakespeare")

FORMAT = 2
CHUNK = 1 << 22  # bytes read at a time: the encoder's memory does not grow with the text
BLOCK = 1 << 25  # bytes per block of a checksum: blocks are hashed in parallel
DTYPES = {"uint8": 256, "int16": 1 << 15, "int32": 1 << 31}  # dtype: how many ids (minus the pad) it holds
UNICODE = 0x110000


@dataclass
class TokenCache:
    """A text's tokens, memory-mapped: `tokens` holds id - 1 for each token (`ids()` adds the 1 back)."""

    path: Path
    tokens: torch.Tensor  # (N,) uint8 / int16 / int32, backed by the file
    vocabulary: list[str]
    lengths: list[int]  # tokens per source file, in order: no window spans two files

    def ids(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.tokens[start:stop].long() + 1


class Stale(Exception):
    """Why a token cache cannot be used as it is."""


def load_tokens(
    files: list[Path] | Callable[[], list[Path]], unit: str, cache_dir: str | Path, digests: list[str] | None = None
) -> TokenCache:
    """The token cache of `files` (their texts in order) as `unit` tokens: opened and verified, or encoded
    now if it is missing or does not verify. With `digests` (a published corpus's SHA-256), `files` may be a
    function that fetches them, called only if they must be encoded: a cached corpus is not even read."""
    if unit not in UNITS:
        raise UsageError(f"data.unit={unit!r} is not a unit; choose char (the text's characters) or byte (its bytes).")
    if digests is None:
        files = files() if callable(files) else files
        digests = [checksum(file) for file in files]
    key = hashlib.sha256(json.dumps({"format": FORMAT, "unit": unit, "sources": digests}).encode()).hexdigest()[:40]
    path = Path(cache_dir).expanduser() / "tokens" / f"{key}.bin"
    try:
        return open_cache(path, key)
    except Stale:
        pass
    with cache_lock(path):
        try:  # another process may have encoded it while this one waited for the lock
            return open_cache(path, key)
        except Stale as reason:
            if path.exists() or path.with_suffix(".json").exists():
                log.warning("The token cache %s is %s: encoding the text again.", path, reason)
        return encode(files() if callable(files) else files, digests, unit, path, key)


def checksum(path: Path) -> str:
    """SHA-256 over the SHA-256s of the file's 32 MB blocks, hashed on every core (hashlib releases the GIL):
    as strong as one SHA-256 of the file, and that many times faster; memory: 1 MB a core."""

    def block(offset: int) -> bytes:
        digest, buffer = hashlib.sha256(), bytearray(1 << 20)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as file:
            file.seek(offset)
            left = BLOCK
            while left and (n := file.readinto(view[: min(left, len(buffer))])):
                digest.update(view[:n])
                left -= n
        return digest.digest()

    offsets = range(0, max(path.stat().st_size, 1), BLOCK)
    with ThreadPoolExecutor(max_workers=min(len(offsets), os.cpu_count() or 1)) as pool:
        return hashlib.sha256(b"".join(pool.map(block, offsets))).hexdigest()


def open_cache(path: Path, key: str) -> TokenCache:
    """Memory-map a token cache after checking it against its record; raises Stale saying what is wrong."""
    try:
        record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Stale("missing") from None
    except (OSError, ValueError):
        raise Stale("unreadable (its record is not JSON)") from None
    try:
        if record["format"] != FORMAT or record["key"] != key:
            raise Stale(f"of another format ({record['format']})")
        dtype, length, vocabulary, lengths = record["dtype"], record["length"], record["vocabulary"], record["lengths"]
        if dtype not in DTYPES or len(vocabulary) - 1 > DTYPES[dtype] or sum(lengths) != length or length < 1:
            raise Stale("inconsistent (its record contradicts itself)")
        expected = length * np.dtype(dtype).itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise Stale(f"truncated ({size} bytes where its record says {expected})")
        if checksum(path) != record["checksum"]:
            raise Stale("damaged (its checksum differs from its record's)")
    except (KeyError, TypeError):
        raise Stale("incomplete (its record lacks fields)") from None
    return mapped(path, dtype, length, vocabulary, lengths)


def mapped(path: Path, dtype: str, length: int, vocabulary: list[str], lengths: list[int]) -> TokenCache:
    tokens = np.memmap(
        path, dtype=dtype, mode="c", shape=(length,)
    )  # copy-on-write: writable for torch, file untouched
    return TokenCache(path, torch.from_numpy(tokens), vocabulary, lengths)


def encode(files: list[Path], digests: list[str], unit: str, path: Path, key: str) -> TokenCache:
    """Encode `files` into `path` and its record, each written beside its target and renamed into place."""
    log.info("Encoding %s once into the token cache %s", files[0] if len(files) == 1 else f"{len(files)} files", path)
    characters = scan_characters(files) if unit == "char" else []
    if unit == "char" and all(ch.isspace() for ch in characters):
        where = f"data.path={str(files[0])!r} is" if len(files) == 1 else f"The {len(files)} files of data.path are"
        raise UsageError(f"{where} empty. Pass a UTF-8 text file with some text in it.")
    vocabulary = BYTE_VOCABULARY if unit == "byte" else [PAD, *characters]
    dtype = next(name for name, capacity in DTYPES.items() if len(vocabulary) - 1 <= capacity)
    chunks = raw_chunks if unit == "byte" else CharacterEncoder(characters, np.dtype(dtype)).chunks
    lengths = []
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    record_partial = partial.with_suffix(".json.part")
    try:
        with open(partial, "wb") as out:
            for file in files:
                lengths.append(0)
                for codes in chunks(file):
                    out.write(codes)
                    lengths[-1] += len(codes)
        if sum(lengths) == 0:
            raise UsageError(f"data.path={str(files[0])!r} is empty. Pass a file with some text in it.")
        record = {
            "format": FORMAT,
            "key": key,
            "unit": unit,
            "dtype": dtype,
            "length": sum(lengths),
            "lengths": lengths,
            "checksum": checksum(partial),
            "vocabulary": vocabulary,
            "sources": [{"name": file.name, "checksum": d} for file, d in zip(files, digests)],
        }
        os.replace(partial, path)
        record_partial.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        os.replace(record_partial, path.with_suffix(".json"))
    except OSError as err:
        path.unlink(missing_ok=True)
        raise UsageError(
            f"Could not write the token cache {path} ({err.strerror}). Free some disk space there, or point "
            "SHAKESPEARE_CACHE (paths.cache_dir) at a folder with room for about one byte per character."
        ) from None
    finally:
        partial.unlink(missing_ok=True)
        record_partial.unlink(missing_ok=True)
    return mapped(path, dtype, sum(lengths), vocabulary, lengths)


def raw_chunks(file: Path) -> Iterator[bytes]:
    """A file's bytes: as byte tokens, each id minus one is the byte itself."""
    with open(file, "rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def text_chunks(file: Path) -> Iterator[bytes | np.ndarray]:
    """A UTF-8 file's text in chunks: ASCII chunks as their bytes, others as arrays of code points (uint32).
    Refuses text that is not UTF-8, or holds NUL bytes, naming the file and the byte."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as source:
        while True:
            chunk = source.read(CHUNK)
            pending = len(utf8.getstate()[0])  # bytes of a character cut by the previous chunk's end
            if chunk.isascii() and not pending:
                text = chunk
            else:
                try:
                    decoded = utf8.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    raise UsageError(
                        f"data.path={str(file)!r} is not UTF-8 text (byte {offset - pending + err.start} cannot be "
                        "decoded). Convert it to UTF-8, or train on its bytes with data.unit=byte."
                    ) from None
                text = np.frombuffer(decoded.encode("utf-32-le"), dtype=np.uint32)
            if b"\x00" in chunk:
                raise UsageError(
                    f"data.path={str(file)!r} looks binary (it contains NUL bytes). Pass a text file, or train on "
                    "its bytes with data.unit=byte."
                )
            if not chunk:
                return
            if len(text):
                yield text
            offset += len(chunk)


def scan_characters(files: list[Path]) -> list[str]:
    """The distinct characters of `files`, sorted (so the vocabulary is the log's `sorted(set(text))`)."""
    present = np.zeros(UNICODE, dtype=bool)
    seen = b""  # the ASCII bytes found so far: most chunks hold no new one, and deleting them is fast
    for file in files:
        for text in text_chunks(file):
            if isinstance(text, bytes):
                if new := text.translate(None, seen):
                    present[np.frombuffer(new, dtype=np.uint8)] = True
                    seen = bytes(np.flatnonzero(present[:128]).astype(np.uint8))
            else:
                present[text] = True
    return [chr(c) for c in np.flatnonzero(present)]


class CharacterEncoder:
    """Code points to id - 1 through a lookup table (bytes.translate for ASCII chunks when ids fit a byte)."""

    def __init__(self, characters: list[str], dtype: np.dtype):
        self.table = np.zeros(UNICODE, dtype=dtype)
        self.table[[ord(ch) for ch in characters]] = np.arange(len(characters))
        self.ascii_table = self.table[:256].tobytes() if dtype == np.uint8 else None

    def chunks(self, file: Path) -> Iterator[bytes | np.ndarray]:
        for text in text_chunks(file):
            if isinstance(text, bytes):
                yield (
                    text.translate(self.ascii_table)
                    if self.ascii_table
                    else self.table[np.frombuffer(text, dtype=np.uint8)]
                )
            else:
                yield self.table[text]
