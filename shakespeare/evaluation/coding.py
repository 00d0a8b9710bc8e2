"""Lossless compression by a trained model: each token of a text is range-coded (arithmetic coding, with the
`constriction` library) under the model's distribution for it given every token before it, so the file takes
about the model's own code length for the text, the sum of -log2 p(token): the loss it was trained to lower.

Decompression must compute exactly the same probabilities, bit for bit, or it decodes garbage from the first
token that differs. So both sides feed the tokens one at a time through one reader (`TokenReader`: the
sliding-window cache on rotary rungs, else the cropped window, as sampling reads), on the CPU, and turn each
token's logits into the coder's table by one function (`probabilities`). Whatever can still differ is caught
before anything is written: the file's header names the checkpoint (its SHA-256), the context rule, the
tokenizer's unit, the text's length and SHA-256, and a fingerprint of the tables the model gives a fixed probe,
which another checkpoint, or a CPU, torch build or thread count that rounds differently, does not reproduce. A
difference the probe misses fails the text's SHA-256 at the end; decompression writes to a temporary file that
is renamed onto the output only once the text is verified.

The file, little-endian (`Header`):

    magic      8 bytes   \\x89 S H K Z \\r \\n \\x1a
    version    1 byte    FORMAT_VERSION
    unit       1 byte    the tokenizer's: 0 char, 1 byte
    context    1 byte    the context rule: 0 crop, 1 slide
    threads    2 bytes   torch's CPU threads when compressed
    tokens     8 bytes   the text's length in tokens
    length     8 bytes   ... and in bytes
    payload    8 bytes   the coded tokens' length in bytes
    checkpoint 32 bytes  SHA-256 of the checkpoint file
    text       32 bytes  SHA-256 of the text
    probe      32 bytes  SHA-256 of the coder's tables for a fixed probe and of its coding (`fingerprint`)
    n          2 bytes   the environment's length
    environment n bytes  torch's version, the machine and its CPU kernels, constriction's version (UTF-8): for messages
    checksum   32 bytes  SHA-256 of everything above and the payload: a damaged file is refused before decoding
    payload              the range coder's 32-bit words
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import constriction
import numpy as np
import torch

from shakespeare.errors import UsageError
from shakespeare.model.generator import ShakespeareGenerator
from shakespeare.model.sampling import next_character_reader
from shakespeare.model.sliding_window import SlidingWindow
from shakespeare.tokenizer import Tokenizer

MAGIC = b"\x89SHKZ\r\n\x1a"  # as PNG's: a non-ASCII first byte, and line endings a text-mode copy would alter
FORMAT_VERSION = 1
SUFFIX = ".shkz"  # compress.py's output when none is named
UNITS = ("char", "byte")  # the tokenizer's unit, by its code in the header
RULES = ("crop", "slide")  # the context rule, by its code
FIXED = struct.Struct("<8sBBBHQQQ32s32s32sH")  # the header up to the environment
DIGEST = 32  # SHA-256's bytes
PAD_ID = 0  # both tokenizers' pad id: never in a text, so never coded; the first token is predicted from it
PROBE = 48  # probe tokens past the context, so the sliding window's ring wraps round
CHUNK = 4096  # tokens decoded before they are written out, and between progress reports

Progress = Callable[[int, int], None]  # (tokens done, tokens in all)


class Undecodable(ValueError):
    """Coded data no encoder wrote under the tables the decoder computes: altered, or computed otherwise."""


class TokenReader:
    """The model fed one token at a time, giving the next token's logits (V,): the reader sampling uses for one
    stream (`next_character_reader`: the sliding-window cache where context=slide or auto picks it, else the
    last sequence_length tokens re-read), so compression and decompression compute every step alike."""

    def __init__(self, model: ShakespeareGenerator, context: str):
        self.reader = next_character_reader(model, context, num_streams=1)
        self.rule = "slide" if isinstance(self.reader, SlidingWindow) else "crop"
        self.T = model.cfg.sequence_length
        self.token = torch.zeros(1, dtype=torch.long)
        self.window = torch.zeros(1, 2 * self.T, dtype=torch.long)  # crop: the tokens so far, shifted back when full
        self.filled = 0

    def __call__(self, token: int) -> torch.Tensor:
        if self.rule == "slide":
            self.token[0] = token
            return self.reader.step(self.token)[0]
        if self.filled == self.window.shape[1]:  # keep the last T - 1: with the new one, the window
            self.window[:, : self.T - 1] = self.window[:, self.filled - self.T + 1 :].clone()
            self.filled = self.T - 1
        self.window[0, self.filled] = token
        self.filled += 1
        return self.reader(self.window[:, max(0, self.filled - self.T) : self.filled])[0]


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """The coder's table (1, V - 1) for the next token from the logits (V,): the model's distribution over every
    token but the pad id, which no text holds (sampling never writes it either); token id i is symbol i - 1.
    One vectorised call, shared as numpy: between two model steps every further call costs as much again."""
    return torch.softmax(logits[PAD_ID + 1 :], dim=0).numpy()[None]


def log_probability(logits: torch.Tensor, table: np.ndarray, symbol: int) -> float:
    """log p(symbol) under the table, or, where float32 rounds it below 1e-30, from the logits directly."""
    p = float(table[0, symbol])
    return math.log(p) if p > 1e-30 else float(torch.log_softmax(logits[PAD_ID + 1 :], dim=0)[symbol])


@torch.inference_mode()
def fingerprint(model: ShakespeareGenerator, rule: str) -> bytes:
    """SHA-256 of the coder's tables for a fixed probe, and of the probe coded under them: the pad id, then a
    fixed run of ids, sequence_length + 48 tokens in all (so the sliding window's ring wraps). Decompression
    recomputes it before decoding a token: another checkpoint, a CPU, torch build or thread count whose float
    rounding differs, or a constriction that quantizes the tables otherwise, does not match it."""
    read, digest, symbols = TokenReader(model, rule), hashlib.sha256(), model.cfg.vocab_size - 1
    encoder, family = constriction.stream.queue.RangeEncoder(), constriction.stream.model.Categorical(perfect=False)
    token = PAD_ID
    for i in range(model.cfg.sequence_length + PROBE):
        table = probabilities(read(token))
        digest.update(table.tobytes())
        token = 1 + (i * 7919 + 13) % symbols
        encoder.encode(np.array([token - 1], dtype=np.int32), family, table)
    digest.update(encoder.get_compressed().astype("<u4").tobytes())
    return digest.digest()


@torch.inference_mode()
def encode_tokens(
    model: ShakespeareGenerator, ids: np.ndarray, rule: str, progress: Progress | None = None
) -> tuple[np.ndarray, float]:
    """The range coder's words for the token ids `ids` (no pad), and the model's own code length for them in bits
    (the sum of -log2 p(token) under the same tables)."""
    read, encoder = TokenReader(model, rule), constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)  # a table per token
    symbols = (ids - 1).astype(np.int32)
    log_p, token = 0.0, PAD_ID
    for i, symbol in enumerate(symbols.tolist()):
        logits = read(token)
        table = probabilities(logits)
        encoder.encode(symbols[i : i + 1], family, table)
        log_p += log_probability(logits, table, symbol)
        token = symbol + 1
        if progress is not None and i % CHUNK == 0:
            progress(i, len(symbols))
    return encoder.get_compressed().astype("<u4"), -log_p / math.log(2)


@torch.inference_mode()
def decode_tokens(
    model: ShakespeareGenerator, words: np.ndarray, count: int, rule: str, progress: Progress | None = None
) -> Iterator[np.ndarray]:
    """The `count` token ids coded in `words`, in chunks of up to CHUNK, each decoded from the table the tokens
    before it give, as `encode_tokens` coded it."""
    read, decoder = TokenReader(model, rule), constriction.stream.queue.RangeDecoder(words.astype(np.uint32))
    family = constriction.stream.model.Categorical(perfect=False)
    chunk, token = np.empty(CHUNK, dtype=np.int64), PAD_ID
    for i in range(count):
        table = probabilities(read(token))
        try:
            token = int(decoder.decode(family, table)[0]) + 1
        except AssertionError as err:  # constriction's refusal of data its encoder cannot have written so
            raise Undecodable(str(err)) from None
        chunk[i % CHUNK] = token
        if i % CHUNK == CHUNK - 1:
            yield chunk.copy()
            if progress is not None:
                progress(i + 1, count)
    yield chunk[: count % CHUNK].copy()


@dataclass(frozen=True)
class Header:
    """What a faithful decompression needs to know and check, written before the payload (the module's docstring
    lays out the bytes)."""

    unit: str
    rule: str
    threads: int
    tokens: int
    text_bytes: int
    payload_bytes: int
    checkpoint_sha256: bytes
    text_sha256: bytes
    fingerprint: bytes
    environment: str

    def pack(self, payload: bytes) -> bytes:
        """The whole file: this header, its checksum over itself and the payload, and the payload."""
        environment = self.environment.encode("utf-8")[:65535]
        fixed = FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            UNITS.index(self.unit),
            RULES.index(self.rule),
            min(self.threads, 65535),
            self.tokens,
            self.text_bytes,
            self.payload_bytes,
            self.checkpoint_sha256,
            self.text_sha256,
            self.fingerprint,
            len(environment),
        )
        head = fixed + environment
        return head + hashlib.sha256(head + payload).digest() + payload

    @classmethod
    def unpack(cls, data: bytes, name: str) -> tuple[Header, bytes]:
        """The header and payload of a compressed file's contents, or one paragraph on why `name` is not a whole,
        undamaged file compress.py wrote."""
        if not data.startswith(MAGIC):
            if MAGIC.startswith(data):
                raise UsageError(f"input={name!r} is cut short: it ends after {len(data)} byte(s), inside its header.")
            raise UsageError(
                f"input={name!r} is not a file compress.py wrote: it does not start with the compressed format's "
                f"magic bytes. Pass a {SUFFIX} file written by `python compress.py`, or mode=compress to compress it."
            )
        if len(data) > len(MAGIC) and data[len(MAGIC)] != FORMAT_VERSION:
            raise UsageError(
                f"input={name!r} is in compressed format version {data[len(MAGIC)]}; this version of the project reads "
                f"version {FORMAT_VERSION}. Decompress it with the version of the project that wrote it."
            )
        if len(data) < FIXED.size:
            raise UsageError(f"input={name!r} is cut short: it ends after {len(data)} bytes, inside its header.")
        *_, unit, rule, threads, tokens, text_bytes, payload_bytes, checkpoint, text, probe, n = FIXED.unpack_from(data)
        start = FIXED.size + n + DIGEST
        if len(data) < start:
            raise UsageError(f"input={name!r} is cut short: it ends after {len(data)} bytes, inside its header.")
        payload = data[start:]
        if len(payload) != payload_bytes:
            how = "is cut short" if len(payload) < payload_bytes else "has bytes after its end (two files joined?)"
            raise UsageError(
                f"input={name!r} {how}: its header announces {payload_bytes:,} bytes of coded text and "
                f"{len(payload):,} follow it. Use a complete copy of the file."
            )
        if hashlib.sha256(data[: start - DIGEST] + payload).digest() != data[start - DIGEST : start]:
            raise UsageError(
                f"input={name!r} is damaged: its checksum does not match its contents (a byte changed in storage or "
                "in transfer), so what it decodes to could not be trusted. Use an undamaged copy of the file."
            )
        if unit >= len(UNITS) or rule >= len(RULES) or payload_bytes % 4:
            raise UsageError(f"input={name!r} is damaged: its header holds values this format never writes.")
        environment = data[FIXED.size : FIXED.size + n].decode("utf-8", errors="replace")
        header = cls(
            UNITS[unit], RULES[rule], threads, tokens, text_bytes, payload_bytes, checkpoint, text, probe, environment
        )
        return header, payload


def environment() -> str:
    """What decides how this process computes the tables and codes them, for messages: torch's version, the
    machine and the CPU kernels torch picked, constriction's version."""
    return (
        f"torch {torch.__version__} on {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"constriction {importlib.metadata.version('constriction')}"
    )


def file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.digest()


def text_ids(tokenizer: Tokenizer, data: bytes, name: str) -> np.ndarray:
    """The token ids of a file's contents: its bytes for a byte-level model; for a character model its UTF-8
    text, refused, naming what is wrong, when it is not UTF-8 or holds characters the vocabulary lacks."""
    if tokenizer.unit == "byte":
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 1  # the byte vocabulary: id = byte + 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"input={name!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start:,} {err.reason}), "
            "and this model reads characters. Compress it with a byte-level model (trained with data.unit=byte), "
            "which codes any file, or convert the file to UTF-8."
        ) from None
    missing = tokenizer.unknown(text)
    if missing:
        first = text.index(missing[0])
        line, column = text.count("\n", 0, first) + 1, first - text.rfind("\n", 0, first)
        raise UsageError(
            f"input={name!r} holds {len(missing)} character(s) the model's vocabulary lacks: "
            f"{' '.join(repr(ch) for ch in missing[:20])}{' ...' if len(missing) > 20 else ''} (the first at line "
            f"{line}, column {column}). A character model codes only the characters it was trained on: remove or "
            "replace them, or compress with a byte-level model (data.unit=byte)."
        )
    return tokenizer.encode(text).numpy()


def text_bytes(tokenizer: Tokenizer) -> Callable[[np.ndarray], bytes]:
    """Token ids back to the file's bytes: the bytes themselves, or the characters as UTF-8."""
    if tokenizer.unit == "byte":
        return lambda ids: (ids - 1).astype(np.uint8).tobytes()
    vocabulary = tokenizer.vocabulary
    return lambda ids: "".join([vocabulary[i] for i in ids.tolist()]).encode("utf-8")


def check_paths(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse, before any work, an input that is not a file and an output that would overwrite it, an existing
    file (unless `overwrite`), or a folder, or that lies in a folder that does not exist."""
    if not source.is_file():
        what = "is a folder" if source.is_dir() else "does not exist"
        raise UsageError(f"input={str(source)!r} {what}. Pass the file to compress or decompress.")
    if target.resolve() == source.resolve() or (target.exists() and target.samefile(source)):
        raise UsageError(
            f"output={str(target)!r} is the input file itself. Write to another file; the input is left as it is."
        )
    if target.is_dir():
        raise UsageError(f"output={str(target)!r} is a folder. Name the file to write, e.g. output={target / 'name'}.")
    if target.exists() and not overwrite:
        raise UsageError(f"output={str(target)!r} exists. Pass overwrite=true to replace it, or name another output.")
    if not target.parent.is_dir():
        raise UsageError(f"output={str(target)!r} is in a folder that does not exist: create {target.parent} first.")


@contextmanager
def written_atomically(target: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `target`, renamed onto it when the block ends and deleted when it raises (Ctrl-C
    included): `target` is either as it was or complete, never half-written."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        file = open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")  # the umask's mode
    except OSError as err:
        raise UsageError(f"output={str(target)!r} cannot be written: {err.strerror}.") from None
    try:
        with file:
            yield file
        os.replace(temporary, target)
    except OSError as err:  # a full disk, a lost permission
        temporary.unlink(missing_ok=True)
        raise UsageError(f"output={str(target)!r} could not be written ({err.strerror}); nothing was left.") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Outcome:
    """What a compression or decompression did, for its summary."""

    mode: str
    source: Path
    target: Path
    unit: str
    rule: str
    tokens: int
    text_bytes: int
    file_bytes: int
    header_bytes: int
    seconds: float
    threads: int
    code_bits: float | None = None  # compression: the model's own code length for the text

    @property
    def payload_bits(self) -> int:
        return 8 * (self.file_bytes - self.header_bytes)

    def summary(self) -> str:
        """Sizes, bits per token against the model's own code length, and the speed."""
        unit = "character" if self.unit == "char" else "byte"
        speed = (
            f"{self.tokens / max(self.seconds, 1e-9):,.0f} {unit}s/s ({self.seconds:.1f} s, {self.threads} thread(s), "
            f"context={self.rule})"
        )
        if self.mode == "decompress":
            return (
                f"Decompressed {self.source} into {self.target}: {self.tokens:,} {unit}s ({self.text_bytes:,} "
                f"bytes), SHA-256 verified.\n{speed}"
            )
        lines = [
            f"Compressed {self.source} ({self.tokens:,} {unit}s, {self.text_bytes:,} bytes) into {self.target} "
            f"({self.file_bytes:,} bytes: {self.header_bytes} of header)."
        ]
        if self.tokens and self.code_bits:
            per = self.payload_bits / self.tokens
            lines.append(
                f"{per:.4f} bits per {unit} ({self.file_bytes * 8 / self.tokens:.4f} with the header); the model's own "
                f"code length is {self.code_bits / self.tokens:.4f}: overhead "
                f"{100 * (self.payload_bits / self.code_bits - 1):+.3f}%."
            )
        lines.append(speed)
        return "\n".join(lines)


def compress_file(
    model: ShakespeareGenerator,
    tokenizer: Tokenizer,
    checkpoint: Path,
    source: Path,
    target: Path,
    context: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Write `source` compressed by `model` (read from the file `checkpoint`) to `target`."""
    check_paths(source, target, overwrite)
    data = source.read_bytes()
    ids = text_ids(tokenizer, data, str(source))
    rule = TokenReader(model, context).rule
    start = time.perf_counter()
    words, code_bits = encode_tokens(model, ids, rule, progress)
    seconds = time.perf_counter() - start
    payload = words.tobytes()
    header = Header(
        unit=tokenizer.unit,
        rule=rule,
        threads=torch.get_num_threads(),
        tokens=len(ids),
        text_bytes=len(data),
        payload_bytes=len(payload),
        checkpoint_sha256=file_sha256(checkpoint),
        text_sha256=hashlib.sha256(data).digest(),
        fingerprint=fingerprint(model, rule),
        environment=environment(),
    )
    contents = header.pack(payload)
    with written_atomically(target) as out:
        out.write(contents)
    return Outcome(
        "compress",
        source,
        target,
        tokenizer.unit,
        rule,
        len(ids),
        len(data),
        len(contents),
        len(contents) - len(payload),
        seconds,
        header.threads,
        code_bits,
    )


def decompress_file(
    model: ShakespeareGenerator,
    tokenizer: Tokenizer,
    checkpoint: Path,
    source: Path,
    target: Path,
    context: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Write the text `source` holds, decoded by `model` (read from the file `checkpoint`), to `target`, once
    every check has passed: the file is whole, it was compressed with this checkpoint, this machine reproduces
    the model's probabilities, and the text decoded has the length and SHA-256 the header records."""
    check_paths(source, target, overwrite)
    name = str(source)
    data = source.read_bytes()
    header, payload = Header.unpack(data, name)
    here = file_sha256(checkpoint)
    if header.checkpoint_sha256 != here:
        raise UsageError(
            f"input={name!r} was compressed with another checkpoint (SHA-256 {header.checkpoint_sha256.hex()[:16]}...) "
            f"than ckpt_path={str(checkpoint)!r} (SHA-256 {here.hex()[:16]}...). Only the very checkpoint that "
            "compressed a file decompresses it: pass that one, byte for byte."
        )
    if header.unit != tokenizer.unit:
        raise UsageError(
            f"input={name!r} holds {header.unit} tokens but the checkpoint's model reads {tokenizer.unit}s."
        )
    if context not in ("auto", header.rule):
        raise UsageError(
            f"context={context} differs from the context rule input={name!r} was compressed with "
            f"(context={header.rule}): decompression reads the text as compression did. Leave context=auto."
        )
    threads = torch.get_num_threads()
    if fingerprint(model, header.rule) != header.fingerprint:
        advice = f"threads={header.threads} " if header.threads != threads else ""
        raise UsageError(
            f"input={name!r} cannot be decompressed here: this process computes the model's probabilities "
            f"differently from the one that compressed it (their fingerprint on a fixed probe differs), so decoding "
            f"would write garbage. The checkpoint is the right one; it was compressed with {header.threads} "
            f"thread(s) under {header.environment}, and this is {threads} thread(s) under {environment()}. Decompress "
            f"with {advice}on a machine with the same kind of CPU and the same torch version as the one that "
            "compressed it."
        )
    start, digest, written = time.perf_counter(), hashlib.sha256(), 0
    to_bytes = text_bytes(tokenizer)
    with written_atomically(target) as out:
        words = np.frombuffer(payload, dtype="<u4")
        try:
            for ids in decode_tokens(model, words, header.tokens, header.rule, progress):
                chunk = to_bytes(ids)
                digest.update(chunk)
                written += len(chunk)
                if written > header.text_bytes:
                    break
                out.write(chunk)
            if written != header.text_bytes:
                wrong = "its length differs from the header's"
            elif digest.digest() != header.text_sha256:
                wrong = "its SHA-256 differs from the header's"
            else:
                wrong = ""
        except Undecodable:
            wrong = "its coded text stopped decoding part way"
        if wrong:
            raise UsageError(
                f"Decompressing input={name!r} did not give back the text it holds ({wrong}), so nothing was written "
                f"to output={str(target)!r}. Either the coded text was altered and the file's checksum recomputed, "
                f"or this machine rounds floats unlike the one that compressed it ({header.threads} thread(s) under "
                f"{header.environment}; here {threads} under {environment()}) where the fingerprint's probe does "
                "not look."
            )
    return Outcome(
        "decompress",
        source,
        target,
        header.unit,
        header.rule,
        header.tokens,
        written,
        len(data),
        len(data) - len(payload),
        time.perf_counter() - start,
        threads,
    )
