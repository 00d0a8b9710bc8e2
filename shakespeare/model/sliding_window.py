"""The fast path of sampling for the rotary rungs: each layer keeps the keys and values of the last T positions
(a sliding window, as Mistral samples), so a character costs one position's work, not T's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from shakespeare.errors import UsageError
from shakespeare.model.generator import Block, ReLUSquared, ShakespeareGenerator


def unwrapped(module: nn.Module | None, rows: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module`'s function on `rows` rows without nn.Module's call machinery (hooks, attribute lookups), which
    costs as much as the arithmetic when one character goes through a layer: a norm is one ATen call, a
    Linear one x @ W.T + b with W.T kept contiguous and b repeated for each row (copies; half a Linear's
    call time on a CPU), ReLU² two in-place calls. None: the identity."""
    if module is None:
        return lambda x: x
    if isinstance(module, nn.LayerNorm):
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return partial(torch.layer_norm, normalized_shape=shape, weight=weight, bias=bias, eps=eps)
    if isinstance(module, nn.RMSNorm):
        return partial(torch.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps)
    if isinstance(module, ReLUSquared):  # in place: its input is a Linear's fresh output, and nothing trains
        return lambda x: torch.relu_(x).square_()
    if isinstance(module, nn.Linear):
        transposed = module.weight.detach().t().contiguous()
        if module.bias is None:
            return partial(torch.mm, mat2=transposed)
        return partial(torch.addmm, module.bias.detach().expand(rows, -1).contiguous(), mat2=transposed)
    return module.forward


def qk_norm(attention: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """QK-norm's two norms (`QKNormAttention`) as one call on queries and keys side by side (B, 2, H, hs), as
    `unwrapped` does for one norm; the identity for attention without them."""
    norms = getattr(attention, "query_norm", None), getattr(attention, "key_norm", None)
    if norms[0] is None:
        return lambda qk: qk
    weight = torch.stack([norm.weight.detach() for norm in norms]).unsqueeze(1)  # (2, 1, hs)
    shape, eps = norms[0].normalized_shape, norms[0].eps
    if isinstance(norms[0], nn.RMSNorm):
        return lambda qk: torch.rms_norm(qk, shape, None, eps) * weight
    bias = torch.stack([norm.bias.detach() for norm in norms]).unsqueeze(1)
    return lambda qk: torch.addcmul(bias, torch.layer_norm(qk, shape, None, None, eps), weight)


@dataclasses.dataclass
class CachedBlock:
    """One Block's functions as `SlidingWindow` calls them on one character per stream, and its ring of keys
    and values: every stream's heads side by side, keys (B*H, hs, T) transposed for the query's product."""

    norm1: Callable
    qkv: Callable
    qk_norm: Callable
    projection: Callable
    norm2: Callable
    feed_forward_in: Callable
    activation: Callable
    feed_forward_out: Callable
    keys: torch.Tensor
    values: torch.Tensor  # (B*H, T, hs)

    def __post_init__(self) -> None:
        self.key_slots, self.value_slots = self.keys.unbind(2), self.values.unbind(1)  # a view of each slot

    @classmethod
    def of(cls, block: Block, num_streams: int, T: int) -> CachedBlock:
        attention, feed_forward = block.heads, block.feed_forward
        H, hs = attention.num_heads, attention.rotary.head_size
        return cls(
            norm1=unwrapped(block.norm1),
            qkv=unwrapped(attention.qkv),
            qk_norm=qk_norm(attention),
            projection=unwrapped(attention.projection, num_streams),
            norm2=unwrapped(block.norm2),
            feed_forward_in=unwrapped(feed_forward.linear, num_streams),
            activation=unwrapped(getattr(feed_forward, feed_forward.activation)),
            feed_forward_out=unwrapped(feed_forward.projection, num_streams),
            keys=attention.qkv.weight.new_zeros(num_streams * H, hs, T),
            values=attention.qkv.weight.new_zeros(num_streams * H, T, hs),
        )


class SlidingWindow:
    """Logits (B, V) for the next character of each of B streams, for the rotary rungs, from cached keys and
    values: each call runs only the characters it has not seen through the blocks, one at a time.

    Each attention layer keeps the keys and values of the last T positions (T = sequence_length, a ring of
    T slots) and the new query attends to them: sliding-window attention, as Mistral samples. Up to T
    characters this is the model's own function. Past them it differs from the cropped window that
    `NextCharacter` re-reads, where every position is recomputed from the window alone: here each layer still
    attends to T positions, but those were computed from their own windows, so information reaches further
    back, and a character costs about 1/T of the work. Only rotary positions allow this: a key rotated by its
    absolute position is compared with a query by their distance alone, so cached keys stay valid.
    """

    def __init__(self, model: ShakespeareGenerator, num_streams: int):
        cfg = model.cfg
        if cfg.position != "rope":
            raise UsageError(
                f"context=slide caches keys for a sliding window, which needs rotary positions (the rope rung "
                f"and above); this {cfg.name} model learns positions 0 to {cfg.sequence_length - 1} and must re-read "
                "its window at every step. Use context=crop (or auto, which picks it)."
            )
        blocks = [block for block in model.blocks if isinstance(block, Block)]
        self.blocks = [CachedBlock.of(block, num_streams, cfg.sequence_length) for block in blocks]
        self.rotary = blocks[0].heads.rotary  # every block's turns are the same
        self.turns = self.rotary.turns  # (T, hs/2), doubled as the window slides past it
        self.embedding, self.linear = model.embedding.weight, unwrapped(model.linear, num_streams)
        self.ngrams = model.ngrams  # None, or the n-gram embeddings added to each character's
        if self.ngrams is not None:  # (B, n): the last n characters read, "none" (vocab_size) before the first
            n, device = len(self.ngrams.tables) + 1, model.linear.weight.device
            self.recent = torch.full((num_streams, n), cfg.vocab_size, dtype=torch.long, device=device)
        self.final_norm = unwrapped(None if isinstance(model.blocks[-1], Block) else model.blocks[-1])
        self.T, self.num_heads = cfg.sequence_length, cfg.num_heads
        self.scales = torch.tensor([self.rotary.head_size**-0.5, 1.0], device=model.linear.weight.device).view(2, 1, 1)
        self.seen = 0  # characters run through the blocks so far: the next one's position

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, n): every character so far; the ones not yet seen go through the blocks."""
        for i in range(self.seen, idx.shape[1]):
            logits = self.step(idx[:, i])
        return logits

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B,): the character at position `seen` of each stream -> logits (B, V) for the one after it."""
        position, slot, filled = self.seen, self.seen % self.T, min(self.seen + 1, self.T)
        if position == len(self.turns):  # the rotary turns of twice as many positions
            self.turns = self.rotary.turns_at(torch.arange(2 * position, device=self.turns.device))
        turns = self.turns[position] * self.scales  # (2, 1, hs/2): the query's turn, scaled, and the key's
        x = F.embedding(idx, self.embedding)  # (B, C); rotary rungs add no position embedding
        if self.ngrams is not None:  # the n-grams this character ends, from the last characters each stream read
            self.recent = torch.cat([self.recent[:, 1:], idx[:, None]], dim=1)
            x += self.ngrams(self.recent)[:, -1]
        B, C = x.shape
        BH = B * self.num_heads
        for block in self.blocks:
            qkv = block.qkv(block.norm1(x)).view(B, 3, self.num_heads, -1)  # (B, 3, H, hs)
            q, k = rotate(block.qk_norm(qkv[:, :2]), turns).unbind(1)  # (B, H, hs) each
            block.key_slots[slot].copy_(k.reshape(BH, -1))  # into the oldest slot
            block.value_slots[slot].copy_(qkv[:, 2].reshape(BH, -1))
            keys, values = block.keys, block.values
            if filled < self.T:  # the ring is not full yet
                keys, values = keys[..., :filled], values[:, :filled]
            y = torch.bmm(torch.bmm(q.reshape(BH, 1, -1), keys).softmax(dim=-1), values)  # (B*H, 1, hs); any slot order
            x += block.projection(y.view(B, C))  # x is this step's own tensor
            x += block.feed_forward_out(block.activation(block.feed_forward_in(block.norm2(x))))
        self.seen += 1
        return self.linear(self.final_norm(x))


def rotate(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """x (..., hs) turned pair by pair by `turn` (hs/2 unit complex numbers): `Rotary.rotate` for one position."""
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * turn).view(x.shape)
