"""Character-level tokenizer: the corpus's sorted characters, with `<|pad|>` at id 0."""

from __future__ import annotations

import torch

PAD = "<|pad|>"


class CharTokenizer:
    """Maps characters to ids and back. Its state is a plain list of strings, so it travels in checkpoints."""

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
