"""Looking inside a rung: what its attention heads look at in a passage, how its validation loss falls with
the context a position sees, and where its token embeddings lie (characters, bytes or BPE tokens).

Everything here reads a model without changing it: the attention weights come from a side pass over one
passage (the fused and flash kernels never build them), the loss by position from the validation losses
before they are averaged.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torchmetrics import Metric

READABLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}  # glyphs DejaVu Sans (matplotlib's font) has
LEFT_LABELS = 60  # pixels at most for the labels left of an attention map: longer ones are shortened


def readable(ch: str) -> str:
    """A character as a label can show it: spaces, newlines and other invisible characters made visible."""
    if ch in READABLE:
        return READABLE[ch]
    return ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")


def token_label(token: str) -> str:
    """A vocabulary entry as a label: a character made readable; a byte token (`<0x41>`) as its character
    while it is ASCII; anything else (`<|pad|>`, `<0xC3>`) as it is."""
    byte = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
    if byte and int(byte[1], 16) < 128:
        token = chr(int(byte[1], 16))
    return readable(token) if len(token) == 1 else token


def bytes_label(data: bytes) -> str:
    """A token's bytes as a label: the text they spell, made readable (` the` -> `␣the`), and bytes that are no
    whole character (a BPE token may hold part of one) as `<0xC3>`."""
    text = data.decode("utf-8", errors="surrogateescape")  # each undecodable byte b becomes U+DC00 + b
    return "".join(f"<0x{ord(ch) - 0xDC00:02X}>" if 0xDC80 <= ord(ch) <= 0xDCFF else readable(ch) for ch in text)


def token_labels(tokenizer) -> list[str]:
    """One readable label per id of a tokenizer: a character, a byte, or a BPE token's text (`<|pad|>` as it is)."""
    return [
        tokenizer.vocabulary[i] if i == tokenizer.pad_id else bytes_label(tokenizer.token_bytes(i))
        for i in range(len(tokenizer))
    ]


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's attention layers in forward order: modules with an `attention_weights` method that are
    not part of another one (the heads of a `MultiHeadAttention` belong to it)."""
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if hasattr(module, "attention_weights") and not any(name.startswith(outer + ".") for outer, _ in layers):
            layers.append((name, module))
    return layers


def layer_title(name: str) -> str:
    """`blocks.2.heads` -> `block 2`; the single attention of the rungs without blocks -> `attention`."""
    parts = name.split(".")
    return f"block {parts[1]}" if parts[0] == "blocks" and len(parts) > 1 else "attention"


def attention_maps(model: nn.Module, idx: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every attention layer's weights (H, T, T) for one passage `idx` (T,): row t is what position t
    attends to. A side pass in eval mode (no dropout): each layer's input is caught on its way in and
    handed to the layer's `attention_weights`, so the model's own forward, fused or not, is untouched."""
    layers = attention_layers(model)
    captured: dict[str, torch.Tensor] = {}

    def catch(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name] = module.attention_weights(args[0])[0].float().cpu()

        return hook

    handles = [module.register_forward_pre_hook(catch(name)) for name, module in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # a compiled model runs its Python forward
            model(idx.unsqueeze(0))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return [(layer_title(name), captured[name]) for name, _ in layers]


def held_out_passage(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """A passage (T,) to show attention on, from a validation batch (B, T): the first window that starts a
    line (right after a newline, where the windows slide by one character), else the first window."""
    windows = windows.detach().cpu()
    newline = next((i for i, label in enumerate(token_labels(tokenizer)) if label == READABLE["\n"]), None)
    if newline is not None and len(windows) > 1:
        starts = windows[:, 0] == newline
        follows = starts[:-1] & ~starts[1:] & (windows[:-1, 1:] == windows[1:, :-1]).all(dim=1)
        if follows.any():
            return windows[int(follows.nonzero()[0]) + 1].clone()
    return windows[0].clone()


@functools.cache
def label_font():
    """DejaVu Sans, matplotlib's own font: it has the glyphs `readable` uses."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 11)


def attention_grid(maps: list[tuple[str, torch.Tensor]], labels: list[str], max_cell: int = 20) -> np.ndarray:
    """One picture (H, W, 3 uint8) of every layer's (rows) every head's (columns) weights: in each map row
    t is what position t attends to, 0 dark to 1 bright (viridis), with the passage's `labels` (one per
    position) on both axes while they fit. Drawn with Pillow: a few milliseconds, where matplotlib takes a
    few hundred."""
    import matplotlib
    from PIL import Image, ImageDraw

    T = maps[0][1].shape[-1]
    cell = max(1, min(max_cell, 160 // T))  # pixels per position: a map is 160-ish pixels wide
    labelled = cell >= 12
    font = label_font()
    widest = max((font.getlength(label) for label in labels), default=0) if labelled else 0
    margin, title, gap = (min(LEFT_LABELS, max(14, round(widest) + 4)) if labelled else 4), 16, 10
    side = T * cell
    columns = max(weights.shape[0] for _, weights in maps)
    width = columns * (margin + side + gap)
    height = len(maps) * (title + side + (margin if labelled else 0) + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colours = matplotlib.colormaps["viridis"]
    for r, (name, weights) in enumerate(maps):
        top = r * (title + side + (margin if labelled else 0) + gap)
        for h, head in enumerate(weights):
            left = h * (margin + side + gap) + margin
            rgb = (colours(head.clamp(0, 1).numpy())[..., :3] * 255).astype(np.uint8)
            image.paste(Image.fromarray(rgb.repeat(cell, axis=0).repeat(cell, axis=1)), (left, top + title))
            draw.text((left, top + 1), f"{name}, head {h}" if len(weights) > 1 else name, fill="black", font=font)
            for t, label in enumerate(labels if labelled else []):
                middle = t * cell + cell // 2
                below, beside = fitted(label, cell + 2, font), fitted(label, margin - 3, font)
                draw.text((left + middle, top + title + side + 1), below, fill="black", font=font, anchor="mt")
                draw.text((left - 2, top + title + middle), beside, fill="black", font=font, anchor="rm")
    return np.asarray(image)


def fitted(label: str, width: float, font) -> str:
    """`label` shortened to `width` pixels, `…` marking the cut: a BPE token's text may be wider than its cell."""
    if font.getlength(label) <= width:
        return label
    kept = label
    while len(kept) > 1 and font.getlength(kept + "…") > width:
        kept = kept[:-1]
    return kept + "…"


class LossByPosition(Metric):
    """The mean loss at each position 1..T of the window over a validation epoch, summed across
    processes: position t predicts its token from t tokens of context."""

    full_state_update = False

    def __init__(self, sequence_length: int):
        super().__init__()
        self.add_state("total", torch.zeros(sequence_length), dist_reduce_fx="sum")
        self.add_state("windows", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor) -> None:
        """`losses`: (B, T) cross-entropies of a batch, unreduced."""
        self.total += losses.detach().sum(dim=0)
        self.windows += losses.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.windows


def position_tags(sequence_length: int, prefix: str) -> list[str]:
    """TensorBoard tags for positions 1..T, zero-padded so they sort in order: `prefix/01` ... `prefix/08`."""
    width = len(str(sequence_length))
    return [f"{prefix}/{t:0{width}d}" for t in range(1, sequence_length + 1)]


def character_embeddings(model: nn.Module, labels: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The token embedding table (V, C) and one readable label per row (`token_labels`), for TensorBoard's
    Projector."""
    return model.embedding.weight.detach().float().cpu(), list(labels)
