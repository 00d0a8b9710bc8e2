"""How many nats a model spends on a held-out text: its static code length, each token once with the context the
model was trained on, and its adaptive (prequential) code length, where the model keeps learning as it reads.

Adaptive evaluation is dynamic evaluation (Krause et al., 2018 and 2019): the text is read in segments, each
scored first and then learned from with one gradient step, so every token is still predicted before the model
has seen it. That is the code length a compressor that adapts (PPMd) is measured by, and it is never the same
figure as the static one: everything that shows it calls it prequential.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch.nn import functional as F

from shakespeare.model.generator import ShakespeareGenerator
from shakespeare.ranges import ABOVE_0, AT_LEAST_1, FRACTION, check_arguments


@dataclass
class CodeLength:
    """A text's code length under a model: `nats` in all over `tokens` predicted tokens of `characters` characters
    (the same number for characters and bytes as tokens; more characters than tokens for subword units)."""

    nats: float
    tokens: int
    characters: int

    @property
    def nats_per_char(self) -> float:
        return self.nats / self.characters

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)


def segments(ids: torch.Tensor, start: int, length: int, context: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, scored) of consecutive segments whose scored targets are every token of ids[start:] once:
    each reads up to `context` tokens ending just before its last target, and scores its last `scored` targets
    (`length` of them, fewer at the end): a segment as long as the context is a window as training read it."""
    for first in range(start, len(ids), length):
        stop = min(first + length, len(ids))
        begin = max(0, stop - 1 - context)
        yield ids[begin : stop - 1], ids[begin + 1 : stop], stop - first


@torch.no_grad()
def static_code_length(model: ShakespeareGenerator, ids: torch.Tensor, start: int, batch_size: int = 64) -> CodeLength:
    """The code length of ids[start:] (the held-out text; ids[:start] its context), every token predicted once
    from the model's windows of sequence_length tokens, as validation with val_stride=sequence_length reads it."""
    training = model.training
    model.eval()
    nats, T = 0.0, model.cfg.sequence_length
    whole = [(x, y) for x, y, _ in segments(ids, start, T, T)]
    try:
        for i in range(0, len(whole), batch_size):
            batch = whole[i : i + batch_size]
            if len(batch[-1][0]) < T:  # the last, shorter segment on its own
                *batch, last = batch
                nats += F.cross_entropy(model(last[0][None])[0], last[1], reduction="sum").item()
            if batch:
                x, y = torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])
                nats += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    finally:
        model.train(training)
    tokens = len(ids) - start
    return CodeLength(nats, tokens, tokens)


@dataclass(frozen=True)
class Adaptation:
    """How the model learns as it reads (dynamic evaluation): after scoring each segment of `segment` tokens (None:
    the model's sequence_length), one step of plain gradient descent at `lr` on that segment's mean loss, on
    `parameters` (all, or only the blocks' weight matrices), then a pull of `decay` of the way back towards the
    trained weights, so the model remembers what it was trained on."""

    lr: Annotated[float, ABOVE_0] = 0.05
    segment: Annotated[int, AT_LEAST_1] | None = None  # at most the model's sequence_length, the context it reads
    decay: Annotated[float, FRACTION] = 0.0
    parameters: Literal["all", "matrices"] = "all"

    def __post_init__(self) -> None:
        check_arguments(Adaptation, vars(self), "adaptation")


def adaptive_code_length(model: ShakespeareGenerator, ids: torch.Tensor, start: int, adaptation: Adaptation) -> CodeLength:
    """The prequential code length of ids[start:]: each segment scored by the model as it stands, then learned from.
    The model passed in is left as it was (a copy adapts)."""
    model = copy.deepcopy(model).eval()  # no dropout: the scores are the model's predictions
    chosen = [p for name, p in model.named_parameters() if adaptation.parameters == "all" or (p.ndim == 2 and name.startswith("blocks."))]
    trained = [p.detach().clone() for p in chosen]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in chosen))
    nats, T = 0.0, model.cfg.sequence_length
    for x, y, scored in segments(ids, start, min(adaptation.segment or T, T), T):
        loss = F.cross_entropy(model(x[None])[0, -scored:], y[-scored:], reduction="sum")
        nats += loss.item()
        (loss / scored).backward()
        with torch.no_grad():
            for p, origin in zip(chosen, trained):
                p.sub_(p.grad, alpha=adaptation.lr)
                if adaptation.decay:
                    p.lerp_(origin, adaptation.decay)
                p.grad = None
    tokens = len(ids) - start
    return CodeLength(nats, tokens, tokens)
