"""Tokenizers: a text's characters (the log's), the 256 byte values (any file), or a byte-level BPE trained on the
training text (`data.unit=bpe`); `<|pad|>` is id 0 in all three.

Every tokenizer says how many characters of the original text each id holds (`characters`): one for a character,
a UTF-8 lead byte's one for bytes and BPE tokens (a continuation byte completes a character counted already), so
losses of any unit read as bits per character of the same text."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable

import torch

PAD = "<|pad|>"
UNITS = ("char", "byte", "bpe")
BYTE_VOCABULARY = [PAD, *(f"<0x{b:02X}>" for b in range(256))]  # id = byte value + 1
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 control characters but tab and newline
MIN_BPE_VOCABULARY = 257  # the pad and the 256 byte values: a BPE vocabulary without a merge
MIN_FREQUENCY = 2  # a pair the training text holds once is not merged: it would only learn that one place


def printable(text: str) -> str:
    """`text` as a terminal or a log may show it: control characters other than newline and tab (ESC, which
    starts terminal commands; SO, which switches the character set; NUL, BEL, C1) written as escapes (`\\x1b`).
    A byte-level model writes them; a terminal would obey them."""
    return CONTROL.sub(lambda match: match[0].encode("unicode_escape").decode("ascii"), text)


def lead_bytes(data: bytes) -> int:
    """The characters `data` begins in UTF-8: its bytes that are not continuation bytes (0b10xxxxxx)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)


class TokenizerError(ValueError):
    """A tokenizer's stored definition cannot be used: missing, not JSON, or not a byte-level BPE of this project."""


class CharTokenizer:
    """Maps characters to ids and back. Its state is a plain list of strings, so it travels in checkpoints."""

    unit = "char"
    definition = None  # nothing beyond the vocabulary

    def __init__(self, vocabulary: list[str]):
        if not vocabulary or vocabulary[0] != PAD:
            raise ValueError(f"a vocabulary must start with {PAD!r} at id 0, got {vocabulary[:3]!r}")
        self.vocabulary = list(vocabulary)
        self.pad_id = 0
        self.characters = [0] + [1] * (len(self.vocabulary) - 1)
        self._ids = {ch: i for i, ch in enumerate(self.vocabulary)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls([PAD, *sorted(set(text))])

    def __len__(self) -> int:
        return len(self.vocabulary)

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self._ids))

    def encode(self, text: str) -> torch.Tensor:
        missing = self.unknown(text)
        if missing:
            raise KeyError(f"characters not in the vocabulary: {''.join(missing)!r}")
        return torch.tensor([self._ids[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int], skip_pad: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.vocabulary[i] for i in ids if not (skip_pad and i == self.pad_id))

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes id `i` stands for (none for the pad)."""
        return b"" if i == self.pad_id else self.vocabulary[i].encode("utf-8")

    def stream_decoder(self) -> StreamDecoder:
        """Text for ids arriving one at a time (sampling): here simply each id's character."""
        return StreamDecoder(lambda i: "" if i == self.pad_id else self.vocabulary[i], lambda: "")


class Utf8Stream:
    """What a byte-level tokenizer's stream decoder shares: bytes held until the character they begin is whole."""

    pad_id = 0

    def token_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.vocabulary)

    def unknown(self, text: str) -> list[str]:
        """Nothing: the 256 byte values spell every text."""
        return []

    def decode(self, ids: torch.Tensor | list[int], skip_pad: bool = True) -> str:
        """The text the ids' bytes spell; bytes that are not UTF-8 become U+FFFD, so generation always prints."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return b"".join(self.token_bytes(i) for i in ids if i != self.pad_id).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """Text for ids arriving one at a time: a character split over several tokens appears once complete, so the
        stream never shows a broken character (one left unfinished at the end is flushed as U+FFFD)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return StreamDecoder(lambda i: utf8.decode(self.token_bytes(i)), lambda: utf8.decode(b"", final=True))


class ByteTokenizer(Utf8Stream):
    """The 256 byte values as ids 1-256 (`<|pad|>` at 0): every file trains and every prompt encodes, as UTF-8.

    Decoded bytes that are not valid UTF-8 become U+FFFD, so generation always prints.
    """

    unit = "byte"
    vocabulary = BYTE_VOCABULARY
    definition = None
    characters = [0, *(1 if b & 0xC0 != 0x80 else 0 for b in range(256))]  # a UTF-8 lead byte begins a character

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + 1

    def token_bytes(self, i: int) -> bytes:
        return b"" if i == self.pad_id else bytes((i - 1,))


def byte_level_alphabet() -> list[str]:
    """The character GPT-2's byte-level alphabet (Hugging Face's ByteLevel) writes each byte value as: the printable
    Latin-1 bytes as themselves, the other 68 as the characters from U+0100 on, in byte order."""
    kept = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


BYTE_OF = {ch: b for b, ch in enumerate(byte_level_alphabet())}


class BPETokenizer(Utf8Stream):
    """A byte-level BPE (Hugging Face `tokenizers`: the ByteLevel pre-tokenizer, decoder and alphabet, merges learned
    by its BpeTrainer) with `<|pad|>` at id 0. Its state is its JSON `definition`, a plain string, so it travels in
    checkpoints; `vocabulary` is its tokens as the library writes them (`Ġthe` is " the")."""

    unit = "bpe"

    def __init__(self, definition: str):
        from tokenizers import Tokenizer

        try:
            settings = json.loads(definition)
            self._tokenizer = Tokenizer.from_str(definition)
        except Exception as err:  # not JSON, or JSON the library cannot read: both are a damaged definition
            raise TokenizerError(f"its tokenizer is not a tokenizer definition ({type(err).__name__})") from None
        self.definition = definition
        kinds = [(settings.get(part) or {}).get("type") for part in ("model", "pre_tokenizer", "decoder")]
        vocabulary = [self._tokenizer.id_to_token(i) for i in range(self._tokenizer.get_vocab_size())]
        alphabet = set(byte_level_alphabet())
        if kinds != ["BPE", "ByteLevel", "ByteLevel"] or vocabulary[:1] != [PAD] or not alphabet <= set(vocabulary):
            raise TokenizerError(
                f"its tokenizer is a {'/'.join(map(str, kinds))} tokenizer, not a byte-level BPE with {PAD} at id 0 "
                "and the 256 byte values"
            )
        if any(ch not in BYTE_OF for token in vocabulary[1:] for ch in token):
            raise TokenizerError("its tokenizer holds tokens that are not byte-level text")
        self.vocabulary = vocabulary
        self._bytes = [b"", *(bytes(BYTE_OF[ch] for ch in token) for token in vocabulary[1:])]
        self.characters = [lead_bytes(data) for data in self._bytes]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: int | None = None) -> BPETokenizer:
        """Learn merges from `texts` (pieces of the training text, each ending where a word ends) until the
        vocabulary holds `vocab_size` ids, pad and bytes included, or no pair occurs `MIN_FREQUENCY` times."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=MIN_FREQUENCY,
            special_tokens=[PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer, length=length)
        return cls(tokenizer.to_str())

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self._tokenizer.encode(text).ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, the texts encoded in parallel (the token cache's pieces)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts)]


class StreamDecoder:
    """`decoder(id)` is the text that id completes (maybe ""); `decoder.flush()` what is left at the end."""

    def __init__(self, step: Callable[[int], str], flush: Callable[[], str]):
        self.step, self.flush = step, flush

    def __call__(self, i: int) -> str:
        return self.step(i)


Tokenizer = CharTokenizer | ByteTokenizer | BPETokenizer


def tokenizer_for(vocabulary: list[str], definition: str | None = None) -> Tokenizer:
    """The tokenizer a vocabulary and a BPE's definition (as checkpoints and token caches keep them) describe: the
    byte vocabulary, a BPE, or characters. Raises TokenizerError for a BPE whose definition is missing or damaged."""
    vocabulary = list(vocabulary)
    if definition is not None:
        tokenizer = BPETokenizer(definition)
        if tokenizer.vocabulary != vocabulary:
            raise TokenizerError(
                f"its tokenizer's {len(tokenizer)} tokens are not its vocabulary's {len(vocabulary)} (one was altered)"
            )
        return tokenizer
    if vocabulary == BYTE_VOCABULARY:
        return ByteTokenizer()
    if any(len(token) != 1 for token in vocabulary[1:]):
        raise TokenizerError(
            f"its vocabulary holds tokens of several characters ({next(t for t in vocabulary[1:] if len(t) != 1)!r}): "
            "a BPE's, whose tokenizer is missing"
        )
    return CharTokenizer(vocabulary)
