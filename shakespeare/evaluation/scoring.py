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

from shakespeare.errors import UsageError
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


def segments(
    ids: torch.Tensor, start: int, length: int, context: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, scored) of consecutive segments whose scored targets are every token of ids[start:] once:
    each reads up to `context` tokens ending just before its last target, and scores its last `scored` targets
    (`length` of them, fewer at the end): a segment as long as the context is a window as training read it."""
    for first in range(start, len(ids), length):
        stop = min(first + length, len(ids))
        begin = max(0, stop - 1 - context)
        yield ids[begin : stop - 1], ids[begin + 1 : stop], stop - first


def held_out_length(ids: torch.Tensor, start: int, characters: list[int] | None) -> tuple[int, int]:
    """(tokens, characters) of ids[start:]: `characters` says how many characters each id holds (the tokenizer's;
    None: one each)."""
    tokens = len(ids) - start
    if characters is None:
        return tokens, tokens
    counts = torch.tensor(characters, dtype=torch.long, device=ids.device)
    return tokens, int(counts[ids[start:]].sum())


@torch.no_grad()
def static_code_length(
    model: ShakespeareGenerator,
    ids: torch.Tensor,
    start: int,
    batch_size: int = 64,
    characters: list[int] | None = None,
) -> CodeLength:
    """The code length of ids[start:] (the held-out text; ids[:start] its context), every token predicted once
    from the model's windows of sequence_length tokens, as validation with val_stride=sequence_length reads it.
    `characters`: characters per id, so the code length reads per character of the text."""
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
    return CodeLength(nats, *held_out_length(ids, start, characters))


@dataclass(frozen=True)
class Adaptation:
    """How the model learns as it reads (dynamic evaluation). After scoring each segment of `segment` targets (None:
    the model's sequence_length; each still read with the context before it), one gradient step on that segment's
    mean loss, on `parameters` (all, or only the blocks' weight matrices): `step=sgd`, plain gradient descent at
    `lr`; `step=rms`, each parameter's step divided by the root mean square of its gradient over `statistics`
    windows of the training text (Krause et al.: parameters that training moved little move little). Then a pull
    of `decay` of the way back towards the trained weights, so the model remembers what it was trained on."""

    lr: Annotated[float, ABOVE_0] = 0.00007
    segment: Annotated[int, AT_LEAST_1] | None = 64  # at most the model's sequence_length, the context it reads
    decay: Annotated[float, FRACTION] = 0.002
    parameters: Literal["all", "matrices"] = "all"
    step: Literal["sgd", "rms"] = "rms"
    statistics: Annotated[int, AT_LEAST_1] = 256  # training windows whose gradients scale an rms step

    def __post_init__(self) -> None:
        check_arguments(Adaptation, vars(self), "adaptation")


def gradient_scale(
    model: ShakespeareGenerator,
    ids: torch.Tensor,
    parameters: list[torch.nn.Parameter],
    windows: int,
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """The root mean square of each parameter's gradient over `windows` windows spread evenly over `ids` (the
    training text), one window's mean loss at a time: what an rms step divides by."""
    T = model.cfg.sequence_length
    starts = torch.linspace(0, len(ids) - T - 1, windows).long()
    squares = [torch.zeros_like(p) for p in parameters]
    for i in range(0, windows, batch_size):
        for start in starts[i : i + batch_size].tolist():
            x, y = ids[start : start + T], ids[start + 1 : start + T + 1]
            F.cross_entropy(model(x[None])[0], y).backward()
            for square, p in zip(squares, parameters):
                square.add_(p.grad.square())
                p.grad = None
    # a floor of a tenth of the tensor's mean: a weight the windows never moved (an unseen character's row) must
    # not take an unbounded step
    return [
        rms.clamp_(min=0.1 * rms.mean().item() + 1e-12) for rms in ((square / windows).sqrt_() for square in squares)
    ]


def adaptive_code_length(
    model: ShakespeareGenerator,
    ids: torch.Tensor,
    start: int,
    adaptation: Adaptation,
    characters: list[int] | None = None,
) -> CodeLength:
    """The prequential code length of ids[start:] (ids[:start]: the training text and context before it): each
    segment scored by the model as it stands, then learned from. The model passed in is left as it was (a copy
    adapts)."""
    model = copy.deepcopy(model).eval()  # no dropout: the scores are the model's predictions
    chosen = [
        p
        for name, p in model.named_parameters()
        if adaptation.parameters == "all" or (p.ndim == 2 and name.startswith("blocks."))
    ]
    trained = [p.detach().clone() for p in chosen]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in chosen))
    scales = gradient_scale(model, ids[:start], chosen, adaptation.statistics) if adaptation.step == "rms" else None
    nats, T = 0.0, model.cfg.sequence_length
    for x, y, scored in segments(ids, start, min(adaptation.segment or T, T), T):
        loss = F.cross_entropy(model(x[None])[0, -scored:], y[-scored:], reduction="sum")
        if not torch.isfinite(loss):
            raise UsageError(
                f"adaptation.lr={adaptation.lr:g} is too large for this model: its loss became {loss.item()} "
                f"{len(ids) - len(y) - start} tokens into the text, as the steps threw its weights off. Lower it, "
                f"e.g. adaptation.lr={adaptation.lr / 10:g}."
            )
        nats += loss.item()
        (loss / scored).backward()
        with torch.no_grad():
            for i, (p, origin) in enumerate(zip(chosen, trained)):
                p.sub_(p.grad if scales is None else p.grad / scales[i], alpha=adaptation.lr)
                if adaptation.decay:
                    p.lerp_(origin, adaptation.decay)
                p.grad = None
    return CodeLength(nats, *held_out_length(ids, start, characters))
