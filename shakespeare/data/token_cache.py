"""The token cache: a text encoded once, chunk by chunk, into a compact file of token ids that every later
run and every DDP rank memory-maps, so memory does not grow with the corpus and nothing is re-encoded.

In `<cache_dir>/tokens/`: `<key>.bin` holds each token's id minus one (the pad, id 0, never occurs in a
text): one byte a token when that fits (at most 256 characters, or the 256 byte values), else two (int16),
else four. `<key>.json` is its record: vocabulary, dtype, length, tokens per source file, the text's characters
with an index of where they lie (characters per block of tokens), a BPE's tokenizer, and the `.bin`'s checksum.
The key hashes the sources' contents and the unit, and for a BPE the settings it was trained with (its size, the
splits), so an edited text gets a new cache. A record that does not match its `.bin` (truncated, damaged, another
format, a tokenizer that does not load) is rebuilt, never trusted. Both files are written beside their target
and renamed, under a lock: concurrent runs and ranks encode once and never see half a file. (No fsync: a file
cut short by a crash fails its checksum and is encoded again.)

A BPE (`unit="bpe"`) is trained on the training text alone, the text before the validation split, and the text is
encoded in separate parts at the splits' cuts, so each split begins on a token and holds the very characters a
char or byte run holds out.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shakespeare.data.corpus import cache_lock
from shakespeare.errors import UsageError
from shakespeare.tokenizer import (
    MIN_BPE_VOCABULARY,
    MIN_FREQUENCY,
    PAD,
    UNITS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    TokenizerError,
    tokenizer_for,
)

log = logging.getLogger("shakespeare")

FORMAT = 3
CHUNK = 1 << 22  # bytes read at a time: the encoder's memory does not grow with the text
BLOCK = 1 << 25  # bytes per block of a checksum: blocks are hashed in parallel
INDEX_BLOCK = 1 << 20  # tokens per entry of the character index: a character is found by scanning one block
PIECE = 1 << 16  # characters per piece a BPE reads or encodes at a time (pieces are encoded in parallel)
DTYPES = {"uint8": 256, "int16": 1 << 15, "int32": 1 << 31}  # dtype: how many ids (minus the pad) it holds
UNICODE = 0x110000


@dataclass
class TokenCache:
    """A text's tokens, memory-mapped: `tokens` holds id - 1 for each token (`ids()` adds the 1 back)."""

    path: Path
    tokens: torch.Tensor  # (N,) uint8 / int16 / int32, backed by the file
    vocabulary: list[str]
    lengths: list[int]  # tokens per source file, in order: no window spans two files
    characters: int = 0  # the text's characters (a file read as bytes: its UTF-8 lead bytes)
    index: tuple[int, ...] = ()  # characters in each block of INDEX_BLOCK tokens
    text_key: str = ""  # the text's own key, whatever its unit: what measures the text itself is kept by it
    definition: str | None = None  # a BPE's tokenizer (its JSON)

    def ids(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.tokens[start:stop].long() + 1

    def token_at(self, character: int, counts: list[int]) -> int:
        """The position of the token holding the first byte of the text's `character`-th character (its character
        count: the end), from the index and one block's scan. `counts`: characters per id (the tokenizer's)."""
        if character >= self.characters:
            return len(self.tokens)
        before = [0, *itertools.accumulate(self.index)]
        block = int(np.searchsorted(before, character, side="right")) - 1
        start = block * INDEX_BLOCK
        ids = self.tokens[start : start + INDEX_BLOCK].numpy().astype(np.int64) + 1
        running = np.cumsum(np.asarray(counts, dtype=np.int64)[ids])
        return start + int(np.searchsorted(running, character - before[block], side="right"))


@dataclass(frozen=True)
class BPESettings:
    """What a BPE's token cache depends on beside its text: the vocabulary's size, and the splits: it is trained on
    the text before the validation split (before the test split where the training windows span validation too,
    data.split=random_windows), and the text is encoded in separate parts at the cuts."""

    vocab_size: int
    val_fraction: float
    test_fraction: float | None = None
    trains_on_validation: bool = False

    def cuts(self, characters: int) -> tuple[int, int]:
        return character_cuts(characters, self.val_fraction, self.test_fraction)

    def training_end(self, characters: int) -> int:
        val_cut, test_cut = self.cuts(characters)
        return test_cut if self.trains_on_validation else val_cut


def character_cuts(characters: int, val_fraction: float, test_fraction: float | None) -> tuple[int, int]:
    """Where the validation and the test text begin, in characters: the last `test_fraction` of the text is the
    test split and the `val_fraction` before it validation, whatever the unit, so char, byte and BPE runs hold out
    the same text (for a text of single-byte characters, where each run's cuts have always been)."""
    test = int(characters * (test_fraction or 0))
    return characters - test - int(characters * val_fraction), characters - test


class Stale(Exception):
    """Why a token cache cannot be used as it is."""


def sha256_of_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:40]


def load_tokens(
    files: list[Path] | Callable[[], list[Path]],
    unit: str,
    cache_dir: str | Path,
    digests: list[str] | None = None,
    bpe: BPESettings | None = None,
) -> TokenCache:
    """The token cache of `files` (their texts in order) as `unit` tokens: opened and verified, or encoded
    now if it is missing or does not verify. With `digests` (a published corpus's SHA-256), `files` may be a
    function that fetches them, called only if they must be encoded: a cached corpus is not even read. A BPE
    (`unit="bpe"`) needs its `bpe` settings, and is trained with them once, when its cache is encoded."""
    if unit not in UNITS:
        raise UsageError(
            f"data.unit={unit!r} is not a unit; choose char (the text's characters), byte (its bytes) or bpe "
            "(byte-level BPE tokens, with data.vocab_size)."
        )
    if (unit == "bpe") != (bpe is not None):
        raise ValueError(f"BPE settings go with unit='bpe' alone (unit={unit!r}, bpe={bpe!r})")
    if digests is None:
        files = files() if callable(files) else files
        digests = [checksum(file) for file in files]
    text_key = sha256_of_json({"sources": digests})
    settings = {"format": FORMAT, "unit": unit, "sources": digests, **({"bpe": asdict(bpe)} if bpe else {})}
    key = sha256_of_json(settings)
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
        return encode(files() if callable(files) else files, digests, unit, path, key, text_key, bpe)


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
        characters, index, definition = record["characters"], record["index"], record["tokenizer"]
        if (
            dtype not in DTYPES
            or len(vocabulary) - 1 > DTYPES[dtype]
            or sum(lengths) != length
            or length < 1
            or sum(index) != characters
            or len(index) != math.ceil(length / INDEX_BLOCK)
        ):
            raise Stale("inconsistent (its record contradicts itself)")
        if definition is not None and hashlib.sha256(definition.encode()).hexdigest() != record["tokenizer_checksum"]:
            raise Stale("damaged (its tokenizer's checksum differs from its record's)")
        expected = length * np.dtype(dtype).itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise Stale(f"truncated ({size} bytes where its record says {expected})")
        if checksum(path) != record["checksum"]:
            raise Stale("damaged (its checksum differs from its record's)")
        tokenizer_for(vocabulary, definition)
    except (KeyError, TypeError):
        raise Stale("incomplete (its record lacks fields)") from None
    except TokenizerError as err:
        raise Stale(f"damaged ({err})") from None
    cache = mapped(path, dtype, length, vocabulary, lengths)
    cache.characters, cache.index, cache.text_key, cache.definition = (
        characters,
        tuple(index),
        record["text_key"],
        definition,
    )
    return cache


def mapped(path: Path, dtype: str, length: int, vocabulary: list[str], lengths: list[int]) -> TokenCache:
    tokens = np.memmap(
        path, dtype=dtype, mode="c", shape=(length,)
    )  # copy-on-write: writable for torch, file untouched
    return TokenCache(path, torch.from_numpy(tokens), vocabulary, lengths)


def dtype_for(vocabulary_size: int) -> str:
    """The smallest dtype that holds every id minus one."""
    return next(name for name, capacity in DTYPES.items() if vocabulary_size - 1 <= capacity)


Chunks = Callable[[int, Path], Iterable[bytes | np.ndarray]]  # (file's number, file) -> its codes, chunk by chunk


def encode(
    files: list[Path],
    digests: list[str],
    unit: str,
    path: Path,
    key: str,
    text_key: str,
    bpe: BPESettings | None = None,
) -> TokenCache:
    """Encode `files` into `path` and its record, each written beside its target and renamed into place."""
    log.info("Encoding %s once into the token cache %s", files[0] if len(files) == 1 else f"{len(files)} files", path)
    tokenizer, chunks = encoder(files, unit, bpe)
    vocabulary, dtype = tokenizer.vocabulary, dtype_for(len(tokenizer))
    lengths = []
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    record_partial = partial.with_suffix(".json.part")
    try:
        with open(partial, "wb") as out:
            for number, file in enumerate(files):
                lengths.append(0)
                for codes in chunks(number, file):
                    out.write(codes)
                    lengths[-1] += len(codes)
        if sum(lengths) == 0:
            raise UsageError(f"data.path={str(files[0])!r} is empty. Pass a file with some text in it.")
        index = character_index(partial, dtype, sum(lengths), tokenizer.characters)
        definition = tokenizer.definition
        record = {
            "format": FORMAT,
            "key": key,
            "text_key": text_key,
            "unit": unit,
            "dtype": dtype,
            "length": sum(lengths),
            "lengths": lengths,
            "characters": sum(index),
            "index": index,
            "checksum": checksum(partial),
            "vocabulary": vocabulary,
            "tokenizer": definition,
            "tokenizer_checksum": hashlib.sha256(definition.encode()).hexdigest() if definition else None,
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
    cache = mapped(path, dtype, sum(lengths), vocabulary, lengths)
    cache.characters, cache.index, cache.text_key, cache.definition = sum(index), tuple(index), text_key, definition
    return cache


def encoder(files: list[Path], unit: str, bpe: BPESettings | None) -> tuple[Tokenizer, Chunks]:
    """The tokenizer of `files` as `unit` tokens (a BPE is trained here), and what encodes each file with it."""
    if unit == "byte":
        return ByteTokenizer(), lambda number, file: raw_chunks(file)
    if unit == "bpe":
        return bpe_encoder(files, bpe)
    characters = scan_characters(files)
    if all(ch.isspace() for ch in characters):
        raise empty_text(files)
    tokenizer = CharTokenizer([PAD, *characters])
    chunks = CharacterEncoder(characters, np.dtype(dtype_for(len(tokenizer)))).chunks
    return tokenizer, lambda number, file: chunks(file)


def empty_text(files: list[Path]) -> UsageError:
    where = f"data.path={str(files[0])!r} is" if len(files) == 1 else f"The {len(files)} files of data.path are"
    return UsageError(f"{where} empty. Pass a UTF-8 text file with some text in it.")


def character_index(path: Path, dtype: str, length: int, counts: list[int]) -> list[int]:
    """The characters in each block of INDEX_BLOCK tokens of a written cache (`counts`: characters per id)."""
    table = np.asarray(counts, dtype=np.int64)
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(length,))
    return [
        int(table[tokens[at : at + INDEX_BLOCK].astype(np.int64) + 1].sum()) for at in range(0, length, INDEX_BLOCK)
    ]


def bpe_encoder(files: list[Path], settings: BPESettings) -> tuple[BPETokenizer, Chunks]:
    """A byte-level BPE trained on the training text of `files`, and what encodes a file with it: in pieces that
    end where words end, and in separate parts at the splits' cuts."""
    sizes = [count_characters(file) for file in files]
    starts = [0, *itertools.accumulate(sizes)]
    total = starts[-1]
    if total == 0:
        raise empty_text(files)
    end = settings.training_end(total)
    log.info("Training a byte-level BPE of %s tokens on the text's first %s characters", settings.vocab_size, end)
    training = (
        piece for file, start in zip(files, starts) if start < end for piece in text_pieces(file, stop=end - start)
    )
    tokenizer = BPETokenizer.train(training, settings.vocab_size)
    if len(tokenizer) < settings.vocab_size:
        raise UsageError(
            f"data.vocab_size={settings.vocab_size} is more than the training text supports: its {end:,} characters "
            f"hold only {len(tokenizer) - MIN_BPE_VOCABULARY:,} pairs of tokens that occur at least {MIN_FREQUENCY} "
            "times to merge, "
            f"so its byte-level BPE ends at {len(tokenizer)} tokens (the pad, the 256 byte values and the merges). "
            f"Use data.vocab_size={len(tokenizer)} or less, or a longer text."
        )
    dtype = np.dtype(dtype_for(len(tokenizer)))
    cuts = settings.cuts(total)

    def chunks(number: int, file: Path) -> Iterator[np.ndarray]:
        inside = [cut - starts[number] for cut in cuts if starts[number] < cut < starts[number + 1]]
        batch: list[str] = []
        for piece in itertools.chain(text_pieces(file, inside), [None]):
            if piece is not None:
                batch.append(piece)
            if batch and (piece is None or len(batch) * PIECE >= CHUNK):
                ids = tokenizer.encode_batch(batch)
                yield (np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64) - 1).astype(dtype)
                batch = []

    return tokenizer, chunks


def count_characters(file: Path) -> int:
    return sum(len(text) for text in text_chunks(file))


def as_text(chunk: bytes | np.ndarray) -> str:
    """A chunk of `text_chunks` as a string: ASCII bytes, or code points."""
    return chunk.decode("ascii") if isinstance(chunk, bytes) else chunk.tobytes().decode("utf-32-le")


def text_pieces(file: Path, cuts: list[int] = (), stop: int | None = None, size: int | None = None) -> Iterator[str]:
    """The file's text (up to character `stop`) in pieces of about `size` characters (PIECE), each ending where a
    word ends, so that encoding the pieces one by one gives the ids encoding the whole text would; a piece also ends
    at each of `cuts` (character offsets), where the text is split into parts encoded on their own."""
    bounds = sorted({cut for cut in cuts if cut > 0} | ({stop} if stop is not None else set()))
    size = size or PIECE
    pending, offset = "", 0  # offset: the file's characters before `pending`
    for chunk in text_chunks(file):
        pending += as_text(chunk)
        while bounds and bounds[0] - offset <= len(pending):  # a cut inside: everything before it, whole
            at = bounds.pop(0) - offset
            yield from word_pieces(pending[:at], size, final=True)[0]
            pending, offset = pending[at:], offset + at
            if stop is not None and offset >= stop:
                return
        done, rest = word_pieces(pending, size, final=False)
        yield from done
        pending, offset = rest, offset + len(pending) - len(rest)
    yield from word_pieces(pending, size, final=True)[0]


def word_pieces(text: str, size: int, final: bool) -> tuple[list[str], str]:
    """`text` in pieces of about `size` characters that end where words end, and the rest after the last such
    place (to go on with the next chunk); `final`: the rest is the last piece."""
    pieces, start = [], 0
    while len(text) - start > size and (end := word_end(text, start + size, start)) is not None:
        pieces.append(text[start:end])
        start = end
    if final and start < len(text):
        pieces.append(text[start:])
        start = len(text)
    return pieces, text[start:]


def word_end(text: str, at: int, low: int) -> int | None:
    r"""A place near `at` (the last one before it, else the first after it) where the ByteLevel pre-tokenizer ends a
    word whatever follows: after a letter, before a character that is not one (its pattern's `?\p{L}+` and
    contractions end there, and what begins there depends only on what follows). None: there is none."""
    for p in itertools.chain(range(min(at, len(text) - 1), low, -1), range(at + 1, len(text))):
        if text[p - 1].isalpha() and not text[p].isalpha():
            return p
    return None


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
