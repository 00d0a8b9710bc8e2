"""The ablation ladder: bigram -> attention head -> multi-head -> feed-forward -> residual -> layer norm -> dropout,
then the modern rungs: RMSNorm -> rotary positions -> ReLU² -> QK-norm.

One `ShakespeareGenerator` whose `GeneratorConfig` switches the rungs on one by one; printing it shows
the same module tree as the research log. Modules a rung does not use are not created at all, and a
modern option picks which module is built (a norm, an activation, an attention), so the printed tree
says what the rung is.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from torch.nn import functional as F

from shakespeare.errors import UsageError
from shakespeare.ranges import AT_LEAST_1, PROBABILITY, check_arguments

ATTENTIONS = ("none", "head", "multihead")
POSITIONS = ("learned", "rope")


class ReLUSquared(nn.Module):
    """relu(x)²: as cheap as ReLU, and trains small transformers faster than GELU (Primer; the nanoGPT speedruns)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}
ACTIVATIONS = {"gelu": nn.GELU, "relu2": ReLUSquared}  # keys name the module in the printed tree


@dataclass
class GeneratorConfig:
    """A rung's model: the parts it has and their sizes. conf/model/ sets them rung by rung; the defaults are
    the bigram's. Each number's meaningful range is its annotation, checked once, with the config."""

    vocab_size: Annotated[int, AT_LEAST_1]
    sequence_length: Annotated[int, AT_LEAST_1]
    name: str = "bigram"
    attention: Literal[ATTENTIONS] = "none"  # none: the bigram; head: one AttentionHead; multihead: MultiHeadAttention
    embedding_size: Annotated[int, AT_LEAST_1] = 32
    num_heads: Annotated[int, AT_LEAST_1] = 4
    feed_forward: bool = False
    residual: bool = False  # wrap attention + feed-forward in residual Blocks with projections
    layer_norm: bool = False
    num_blocks: Annotated[int, AT_LEAST_1] = 1
    dropout: Annotated[float, PROBABILITY] = 0.0
    # the hidden width of a Block's feed-forward; None: embedding_size (the log's)
    feed_forward_size: Annotated[int, AT_LEAST_1] | None = None
    # dropout on the attention weights; None: `dropout` (0 lets fused attention take the flash kernel)
    attention_dropout: Annotated[float, PROBABILITY] | None = None
    fused_attention: bool = False  # all heads in one q/k/v Linear + scaled_dot_product_attention: same function, faster
    norm: Literal[tuple(NORMS)] = (
        "layer"  # layer: LayerNorm (the log's); rms: RMSNorm (no mean, no bias; model=rmsnorm)
    )
    position: Literal[POSITIONS] = (
        "learned"  # learned: an Embedding added to the input (the log's); rope: rotary (model=rope)
    )
    activation: Literal[tuple(ACTIVATIONS)] = (
        "gelu"  # the feed-forward's: gelu (the log's); relu2: relu(x)² (model=relu2)
    )
    qk_norm: bool = False  # normalise each head's queries and keys (with `norm`) before the rotation (model=qk_norm)
    # each position adds an embedding of the 2, 3, ..., ngrams characters ending there (1: none; model=ngram)
    ngrams: Annotated[int, AT_LEAST_1] = 1
    ngram_buckets: Annotated[int, AT_LEAST_1] = 16384  # rows of each n-gram table: more n-grams share a row (hashed)
    compile: bool = False  # torch.compile the model (the first steps pay for compiling); ShakespeareModule applies it

    def __post_init__(self) -> None:
        for key, choices in (
            ("attention", ATTENTIONS),
            ("norm", NORMS),
            ("position", POSITIONS),
            ("activation", ACTIVATIONS),
        ):
            if getattr(self, key) not in choices:
                raise UsageError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(choices)}.")
        check_arguments(GeneratorConfig, vars(self), "model")
        if self.attention == "multihead" and self.embedding_size % self.num_heads:
            raise UsageError(
                f"model.num_heads={self.num_heads} does not divide model.embedding_size={self.embedding_size}: "
                f"each head gets embedding_size / num_heads channels. Pick num_heads among "
                f"{[h for h in range(1, self.embedding_size + 1) if self.embedding_size % h == 0]}."
            )
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.feed_forward_size is not None and not self.residual:
            raise UsageError(
                f"model.feed_forward_size={self.feed_forward_size!r} needs model.residual=true (a Block projects the "
                "hidden width back), e.g. model=block model.feed_forward_size=128."
            )
        if self.residual and self.attention != "multihead":
            raise UsageError(f"model.residual=true needs model.attention=multihead, got {self.attention!r}.")
        if self.position == "rope" and not self.residual:
            raise UsageError(
                "model.position=rope rotates the queries and keys of fused attention inside residual blocks: it "
                "needs model.residual=true (got false). Start from a rung with blocks, e.g. model=rope."
            )
        if self.position == "rope" and not self.fused_attention:
            raise UsageError(
                "model.position=rope rotates the queries and keys of fused attention (all heads in one q/k/v "
                "Linear), so it needs model.fused_attention=true (got false). Drop model.fused_attention=false, "
                "or pick a rung before rope (e.g. model=rmsnorm) for per-head attention modules."
            )
        if self.qk_norm and self.position != "rope":
            raise UsageError(
                f"model.qk_norm=true normalises queries and keys before their rotation: it needs "
                f"model.position=rope (got {self.position!r}), e.g. model=qk_norm."
            )

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Every setting that has a default, at it: the bigram's model, and what a model saved before a setting
        existed had (it was built without that setting's part)."""
        return {f.name: f.default for f in fields(GeneratorConfig) if f.default is not MISSING}

    def unused(self) -> set[str]:
        """The settings this model never reads, because it lacks the part that would (num_heads on the bigram).

        The structural keys (attention, feed_forward, residual, layer_norm, dropout) switch parts on and so
        turn one rung into another; they are unused only where the part they switch on cannot exist.
        """
        attention, blocks = self.attention != "none", self.residual
        reads = {
            "embedding_size": attention,
            "dropout": attention,
            "attention_dropout": attention,
            "fused_attention": attention,
            "residual": attention,
            "num_heads": self.attention == "multihead",
            "feed_forward": attention and not blocks,  # every Block has its own feed-forward
            "layer_norm": blocks,
            "num_blocks": blocks,
            "feed_forward_size": blocks,
            "norm": blocks and self.layer_norm,
            "position": attention,
            "activation": blocks or (attention and self.feed_forward),
            "qk_norm": blocks,
            "ngrams": attention,
            "ngram_buckets": attention and self.ngrams > 1,
        }
        return {key for key, read in reads.items() if not read}


# Settings no rung of conf/model/ reads, because another setting must switch their part on first: what does.
SWITCHED_ON_BY = {"ngram_buckets": "model.ngrams=2 or more (rung=ngram)"}


def maybe_dropout(p: float) -> nn.Dropout | None:
    """Rungs without dropout have no Dropout module at all, so their printed tree matches the log."""
    return nn.Dropout(p) if p > 0 else None


class AttentionHead(nn.Module):
    """One causal self-attention head."""

    def __init__(self, embedding_size: int, head_size: int, sequence_length: int, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(embedding_size, head_size, bias=False)
        self.key = nn.Linear(embedding_size, head_size, bias=False)
        self.value = nn.Linear(embedding_size, head_size, bias=False)
        self.dropout = maybe_dropout(dropout)
        self.register_buffer("causal", torch.ones(sequence_length, sequence_length).tril().bool(), persistent=False)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T): how much each position attends to each earlier one, before dropout."""
        T = x.shape[1]
        q, k = self.query(x), self.key(x)  # (B, T, hs)
        weights = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        return weights.masked_fill(~self.causal[:T, :T], float("-inf")).softmax(dim=-1).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.attention_weights(x)[:, 0]  # (B, T, T)
        if self.dropout is not None:
            weights = self.dropout(weights)
        return weights @ self.value(x)


class MultiHeadAttention(nn.Module):
    """Heads side by side, concatenated; the residual rungs add a projection back into the stream."""

    def __init__(self, cfg: GeneratorConfig, projection: bool):
        super().__init__()
        C = cfg.embedding_size
        self.heads = nn.ModuleList(
            AttentionHead(C, C // cfg.num_heads, cfg.sequence_length, cfg.attention_dropout)
            for _ in range(cfg.num_heads)
        )
        self.projection = nn.Linear(C, C) if projection else None
        self.dropout = maybe_dropout(cfg.dropout) if projection else None

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T): every head's attention weights, before dropout."""
        return torch.cat([head.attention_weights(x) for head in self.heads], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([head(x) for head in self.heads], dim=-1)
        if self.projection is not None:
            x = self.projection(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


class FusedAttention(nn.Module):
    """All heads at once: one q/k/v Linear and PyTorch's scaled_dot_product_attention.

    The same function as `MultiHeadAttention` (rows of `qkv` are every head's query, then key, then value
    weights), faster on every device. With attention_dropout=0 PyTorch takes its flash kernel, which
    never materialises the (B, H, T, T) weights.
    """

    def __init__(self, cfg: GeneratorConfig, num_heads: int, projection: bool):
        super().__init__()
        C = cfg.embedding_size
        self.num_heads = num_heads
        self.attention_dropout = cfg.attention_dropout
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.projection = nn.Linear(C, C) if projection else None
        self.dropout = maybe_dropout(cfg.dropout) if projection else None

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's queries and keys as attention compares them (`queries_keys`), and values: (B, H, T, hs)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.queries_keys(q, k)
        return q, k, v

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T): the weights scaled_dot_product_attention applies without building them, before dropout.
        Only for inspecting a passage: training never calls it."""
        T = x.shape[1]
        q, k, _ = self.split_heads(x)
        weights = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return weights.masked_fill(~causal, float("-inf")).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.split_heads(x)  # (B, H, T, hs)
        p = self.attention_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, hs)
        x = x.transpose(1, 2).reshape(B, T, C)
        if self.projection is not None:
            x = self.projection(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries and keys as attention compares them; the modern variants position and normalise them."""
        return q, k

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_dropout={self.attention_dropout}"


class Rotary(nn.Module):
    """Rotary position embedding (RoPE): turns each pair of a head's query and key channels by an angle
    proportional to the position, so their dot product depends on how far apart the two positions are.
    A pair is a complex number and a turn a multiplication (one kernel, where cos/sin take five)."""

    def __init__(self, head_size: int, sequence_length: int, base: float = 10000.0):
        super().__init__()
        self.head_size, self.base = head_size, base
        turns = self.turns_at(torch.arange(sequence_length, device="cpu"))  # (T, hs/2)
        self.register_buffer("turns", turns.to(torch.get_default_device()), persistent=False)  # meta for estimates

    def turns_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(len(positions), hs/2) unit complex numbers: the turns for these absolute positions. Angles in float64
        on the CPU (exact at large positions, and MPS has no float64), then moved to the positions' device."""
        channels = torch.arange(0, self.head_size, 2, dtype=torch.float64, device="cpu")
        frequencies = self.base ** -(channels / self.head_size)  # (hs/2,)
        angles = torch.outer(positions.cpu().double(), frequencies)  # (len(positions), hs/2)
        return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(positions.device)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, Tq, hs) holds the last Tq of the Tk positions in k (B, H, Tk, hs)."""
        Tq, Tk = q.shape[-2], k.shape[-2]
        turns = self.turns[:Tk] if Tk <= len(self.turns) else self.turns_at(torch.arange(Tk, device=k.device))
        return self.rotate(q, turns[Tk - Tq :]), self.rotate(k, turns)

    @staticmethod
    def rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, hs/2)
        return torch.view_as_real(pairs * turns).flatten(-2).type_as(x)

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, base={self.base:g}"


class RotaryAttention(FusedAttention):
    """Fused attention with rotary positions: queries and keys are rotated by their position (RoPE), and
    the model adds no position embedding to its input."""

    def __init__(self, cfg: GeneratorConfig, num_heads: int, projection: bool):
        super().__init__(cfg, num_heads, projection)
        self.rotary = Rotary(cfg.embedding_size // num_heads, cfg.sequence_length)

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(q, k)


class QKNormAttention(RotaryAttention):
    """Rotary attention whose queries and keys are normalised per head first (QK-norm, with the model's norm):
    the attention logits stay bounded however large the weights grow, so higher learning rates stay stable."""

    def __init__(self, cfg: GeneratorConfig, num_heads: int, projection: bool):
        super().__init__(cfg, num_heads, projection)
        self.query_norm = NORMS[cfg.norm](cfg.embedding_size // num_heads)
        self.key_norm = NORMS[cfg.norm](cfg.embedding_size // num_heads)

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().queries_keys(self.query_norm(q), self.key_norm(k))


def attention(cfg: GeneratorConfig, projection: bool) -> nn.Module:
    """The rung's multi-head attention: the log's per-head modules, all heads fused, or a modern variant."""
    if cfg.qk_norm:
        return QKNormAttention(cfg, cfg.num_heads, projection)
    if cfg.position == "rope":
        return RotaryAttention(cfg, cfg.num_heads, projection)
    if cfg.fused_attention:
        return FusedAttention(cfg, cfg.num_heads, projection)
    return MultiHeadAttention(cfg, projection)


class FeedForward(nn.Module):
    """Per-position Linear + activation (GELU, or ReLU² from the relu2 rung on); the residual rungs add a
    projection back into the stream."""

    def __init__(self, cfg: GeneratorConfig, projection: bool):
        super().__init__()
        C, H = cfg.embedding_size, cfg.feed_forward_size or cfg.embedding_size
        self.linear = nn.Linear(C, H)
        self.activation = cfg.activation  # the module's name in the tree: (gelu) or (relu2)
        self.add_module(cfg.activation, ACTIVATIONS[cfg.activation]())
        self.projection = nn.Linear(H, C) if projection else None
        self.dropout = maybe_dropout(cfg.dropout) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, self.activation)(self.linear(x))
        if self.projection is not None:
            x = self.projection(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


class Block(nn.Module):
    """Attention then feed-forward, each added back to the residual stream (pre-norm when layer_norm)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        C = cfg.embedding_size
        self.norm1 = NORMS[cfg.norm](C) if cfg.layer_norm else None
        self.heads = attention(cfg, projection=True)
        self.norm2 = NORMS[cfg.norm](C) if cfg.layer_norm else None
        self.feed_forward = FeedForward(cfg, projection=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.heads(x if self.norm1 is None else self.norm1(x))
        x = x + self.feed_forward(x if self.norm2 is None else self.norm2(x))
        return x


class NGramEmbedding(nn.Module):
    """The embeddings of the n-grams ending at each position (n = 2 .. ngrams), one table per n, summed: what the
    characters just before say, handed to the first block rather than gathered by attention (the hash n-gram
    embeddings of the Byte Latent Transformer). A table has a row per n-gram where they all fit in `buckets`
    rows, else n-grams share rows by a hash. Tables start at zero, so the model starts as its rung without them.
    Positions before the window's start read as `vocab_size` (no character): the model sees its window only.
    idx (B, T) may hold `vocab_size` too (the sliding window's characters before the first)."""

    def __init__(self, vocab_size: int, embedding_size: int, ngrams: int, buckets: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = [min(buckets, (vocab_size + 1) ** n) for n in range(2, ngrams + 1)]
        self.tables = nn.ModuleList(nn.Embedding(rows, embedding_size) for rows in self.rows)
        for table in self.tables:
            nn.init.zeros_(table.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> (B, T, C)."""
        T, V = idx.shape[1], self.vocab_size
        key, x = idx.long(), 0.0
        for n, (rows, table) in enumerate(zip(self.rows, self.tables), start=2):
            key = key * (V + 1) + F.pad(idx.long(), (n - 1, 0), value=V)[:, :T]  # a digit per character: exact
            x = x + table(key if rows == (V + 1) ** n else hashed(key) % rows)
        return x

    def extra_repr(self) -> str:
        return f"ngrams=2..{len(self.tables) + 1}, rows={self.rows}"


def hashed(key: torch.Tensor) -> torch.Tensor:
    """Spreads the n-gram numbers over int64 (multiply by an odd constant, wrapping; fold the high bits in), so
    the rows they share are a pseudo-random choice rather than ones a modulus lines up."""
    key = key * 0x9E3779B97F4A7C1
    return key ^ (key >> 29)


def no_positional_embedding(positions: torch.Tensor) -> float:
    """Rotary rungs add nothing to the input: their attention rotates queries and keys by position instead."""
    return 0.0


class ShakespeareGenerator(nn.Module):
    """Next-character model: token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        V, T, C = cfg.vocab_size, cfg.sequence_length, cfg.embedding_size
        if cfg.attention == "none":  # the bigram: each character's row of logits is learned directly
            self.embedding = nn.Embedding(V, V, padding_idx=0)
            return
        self.embedding = nn.Embedding(V, C)
        self.ngrams = NGramEmbedding(V, C, cfg.ngrams, cfg.ngram_buckets) if cfg.ngrams > 1 else None
        self.positional_embedding = nn.Embedding(T, C) if cfg.position == "learned" else no_positional_embedding
        if cfg.residual:
            norm = [NORMS[cfg.norm](C)] if cfg.layer_norm else []
            self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.num_blocks)], *norm)
        elif cfg.attention == "head" and cfg.fused_attention:
            self.head = FusedAttention(cfg, num_heads=1, projection=False)
        elif cfg.attention == "head":
            self.head = AttentionHead(C, C, T, cfg.attention_dropout)
        else:
            self.heads = attention(cfg, projection=False)
        self.feed_forward = FeedForward(cfg, projection=False) if cfg.feed_forward and not cfg.residual else None
        self.linear = nn.Linear(C, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cfg.attention == "none":
            return self.embedding(idx)
        T = idx.shape[1]
        x = self.embedding(idx) + self.positional_embedding(torch.arange(T, device=idx.device))  # (B, T, C)
        if self.ngrams is not None:
            x = x + self.ngrams(idx)
        if self.cfg.residual:
            x = self.blocks(x)
        else:
            x = self.head(x) if self.cfg.attention == "head" else self.heads(x)
            if self.feed_forward is not None:
                x = self.feed_forward(x)
        return self.linear(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss at every position (B, T), unreduced: validation keeps it by position in the window."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
