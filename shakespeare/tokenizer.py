"""Tokenizers: a text's characters (the log's), or the 256 byte values (any file); `<|pad|>` is id 0 in both."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable

import torch

PAD = "<|pad|>"
UNITS = ("char", "byte")
BYTE_VOCABULARY = [PAD, *(f"<0x{b:02X}>" for b in range(256))]  # id = byte value + 1
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 control characters but tab and newline


def printable(text: str) -> str:
    """`text` as a terminal or a log may show it: control characters other than newline and tab (ESC, which
    starts terminal commands; SO, which switches the character set; NUL, BEL, C1) written as escapes (`\\x1b`).
    A byte-level model writes them; a terminal would obey them."""
    return CONTROL.sub(lambda match: match[0].encode("unicode_escape").decode("ascii"), text)


class CharTokenizer:
    """Maps characters to ids and back. Its state is a plain list of strings, so it travels in checkpoints."""

    unit = "char"

    def __init__(self, vocabulary: list[str]):
        if not vocabulary or vocabulary[0] != PAD:
            raise ValueError(f"a vocabulary must start with {PAD!r} at id 0, got {vocabulary[:3]!r}")
        self.vocabulary = list(vocabulary)
        self.pad_id = 0
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

    def stream_decoder(self) -> StreamDecoder:
        """Text for ids arriving one at a time (sampling): here simply each id's character."""
        return StreamDecoder(lambda i: "" if i == self.pad_id else self.vocabulary[i], lambda: "")


class ByteTokenizer:
    """The 256 byte values as ids 1-256 (`<|pad|>` at 0): every file trains and every prompt encodes, as UTF-8.

    Decoded bytes that are not valid UTF-8 become U+FFFD, so generation always prints.
    """

    unit = "byte"
    vocabulary = BYTE_VOCABULARY
    pad_id = 0

    def __len__(self) -> int:
        return len(self.vocabulary)

    def unknown(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + 1

    def decode(self, ids: torch.Tensor | list[int], skip_pad: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(i - 1 for i in ids if i != self.pad_id).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """Text for byte ids arriving one at a time: a character split over several bytes appears once complete."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return StreamDecoder(
            lambda i: utf8.decode(bytes((i - 1,))) if i != self.pad_id else "", lambda: utf8.decode(b"", final=True)
        )


class StreamDecoder:
    """`decoder(id)` is the text that id completes (maybe ""); `decoder.flush()` what is left at the end."""

    def __init__(self, step: Callable[[int], str], flush: Callable[[], str]):
        self.step, self.flush = step, flush

    def __call__(self, i: int) -> str:
        return self.step(i)


Tokenizer = CharTokenizer | ByteTokenizer


def tokenizer_for(vocabulary: list[str]) -> Tokenizer:
    """The tokenizer a vocabulary (as checkpoints keep it) describes: the byte vocabulary, or characters."""
    return ByteTokenizer() if list(vocabulary) == BYTE_VOCABULARY else CharTokenizer(vocabulary)
