"""Autoregressive sampling: a trained model writes text, one character per step, never `<|pad|>`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from shakespeare.errors import UsageError
from shakespeare.model import Block, ReLUSquared, ShakespeareGenerator
from shakespeare.tokenizer import Tokenizer

ON_UNKNOWN = ("error", "skip")
CONTEXTS = ("auto", "crop", "slide")  # auto: slide where the model allows it (rotary rungs), else crop
HEAD_WEIGHT = re.compile(r"(.+?)(?:\.heads\.(\d+))?\.(query|key|value)\.weight")  # blocks.0.heads.heads.3.key.weight


def fuse_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head attention weights under the fused model's names: each attention's `qkv.weight` stacks every
    head's query rows, then the keys, then the values."""
    fused, parts = {}, {}
    for name, tensor in state.items():
        match = HEAD_WEIGHT.fullmatch(name)
        if match is None:
            fused[name] = tensor
        else:
            parts.setdefault(match[1], {}).setdefault(match[3], {})[int(match[2] or 0)] = tensor
    for prefix, qkv in parts.items():
        rows = [qkv[kind][head] for kind in ("query", "key", "value") for head in sorted(qkv[kind])]
        fused[f"{prefix}.qkv.weight"] = torch.cat(rows)
    return fused


class NextCharacter:
    """Logits (B, V) for the character after each row of `idx`: the model's own function at its last
    position, in fewer operations, as sampling needs nothing else.

    Per-head attention (the log's tree) is fused into one q/k/v Linear + scaled_dot_product_attention,
    Dropout modules are left out (dropout is off when sampling), and the last attention layer and all
    after it run for the last position only. The fused twin is built on the meta device around the
    model's own weights: nothing is copied and no random numbers are drawn. Its parts are looked up
    once here, not at every step.
    """

    def __init__(self, model: ShakespeareGenerator):
        self.cfg = cfg = model.cfg
        if cfg.attention == "none":  # the bigram reads only the last character anyway
            self.model = model
            return
        with torch.device("meta"):
            fused = ShakespeareGenerator(dataclasses.replace(cfg, fused_attention=True, dropout=0.0, attention_dropout=0.0))
        state = model.state_dict() if cfg.fused_attention else fuse_heads(model.state_dict())
        fused.load_state_dict(state, assign=True)
        for name, _ in fused.named_buffers():  # not in the state dict (RoPE's angles): the model's own
            module, _, buffer = name.rpartition(".")
            setattr(fused.get_submodule(module), buffer, model.get_buffer(name))
        self.model = fused.eval()
        self.embedding, self.linear = fused.embedding, fused.linear
        self.positions = fused.positional_embedding.weight if cfg.position == "learned" else None  # rope: in attention
        self.final_norm = self.norm1 = self.norm2 = None
        if cfg.residual:
            *self.body, last = [block for block in fused.blocks if isinstance(block, Block)]
            self.norm1, self.norm2, self.feed_forward, attention = last.norm1, last.norm2, last.feed_forward, last.heads
            if not isinstance(fused.blocks[-1], Block):
                self.final_norm = fused.blocks[-1]
        else:
            self.body, self.feed_forward = [], fused.feed_forward
            attention = fused.head if cfg.attention == "head" else fused.heads
        C, self.num_heads, self.projection = cfg.embedding_size, attention.num_heads, attention.projection
        self.queries_keys = attention.queries_keys  # rotary and QK-norm attention position and normalise them
        self.query, self.key_value = attention.qkv.weight[:C], attention.qkv.weight[C:]  # qkv rows: q, then k, then v

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model})"

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, n): every character so far; the model reads the last sequence_length of them."""
        if self.cfg.attention == "none":
            return self.model(idx[:, -1:])[:, -1]
        idx = idx[:, -self.cfg.sequence_length :]
        B, T = idx.shape
        C, H = self.cfg.embedding_size, self.num_heads
        x = self.embedding(idx)  # (B, T, C)
        if self.positions is not None:
            x = x + self.positions[:T]
        for block in self.body:
            x = block(x)
        h = x if self.norm1 is None else self.norm1(x)
        q = F.linear(h[:, -1:], self.query).view(B, 1, H, C // H).transpose(1, 2)  # (B, H, 1, hs)
        k, v = F.linear(h, self.key_value).view(B, T, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hs)
        q, k = self.queries_keys(q, k)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C)  # the last query sees all keys
        if self.projection is not None:
            y = self.projection(y)
        if self.cfg.residual:
            x = x[:, -1:] + y
            x = x + self.feed_forward(x if self.norm2 is None else self.norm2(x))
            if self.final_norm is not None:
                x = self.final_norm(x)
        else:
            x = y if self.feed_forward is None else self.feed_forward(y)
        return self.linear(x)[:, -1]


def plain(module: nn.Module | None, rows: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
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
    `plain` does for one norm; the identity for attention without them."""
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
            norm1=plain(block.norm1),
            qkv=plain(attention.qkv),
            qk_norm=qk_norm(attention),
            projection=plain(attention.projection, num_streams),
            norm2=plain(block.norm2),
            feed_forward_in=plain(feed_forward.linear, num_streams),
            activation=plain(getattr(feed_forward, feed_forward.activation)),
            feed_forward_out=plain(feed_forward.projection, num_streams),
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
        self.embedding, self.linear = model.embedding.weight, plain(model.linear, num_streams)
        self.final_norm = plain(None if isinstance(model.blocks[-1], Block) else model.blocks[-1])
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


def next_character_reader(model: ShakespeareGenerator, context: str, num_streams: int) -> NextCharacter | SlidingWindow:
    """What reads the characters so far and gives the next one's logits: the window re-read at every step
    (crop, the function the model was trained on) or the sliding-window cache (slide; auto picks it where the
    model's positions allow it)."""
    if context == "slide" or (context == "auto" and model.cfg.position == "rope" and model.cfg.residual):
        return SlidingWindow(model, num_streams)
    return NextCharacter(model)


def check_options(
    max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int, context: str = "auto"
) -> None:
    """Refuse sampling options that have no meaning, naming the value and a sensible one."""
    if context not in CONTEXTS:
        raise UsageError(
            f"context={context!r} is not one of {', '.join(CONTEXTS)}: crop re-reads the last sequence_length "
            "characters at every step, slide caches keys and values (rotary rungs), auto picks slide where it can."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens={max_new_tokens!r} must be a whole number of at least 0, e.g. 500.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise UsageError(
            f"temperature={temperature!r} must be a number of at least 0: 1.0 samples the model as trained, lower is "
            "more conservative (e.g. 0.8), higher more adventurous, and 0 always picks the likeliest character."
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UsageError(
            f"top_k={top_k!r} must be a whole number of at least 1 (sample among the k likeliest characters), "
            "or null to sample among all of them."
        )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UsageError(f"num_samples={num_samples!r} must be a whole number of at least 1.")


def encode_prompt(tokenizer: Tokenizer, prompt: str, on_unknown: str = "error") -> torch.Tensor:
    """The prompt's ids; characters the model never saw are an error, or dropped with on_unknown=skip."""
    if on_unknown not in ON_UNKNOWN:
        raise UsageError(f"on_unknown={on_unknown!r} is not one of {', '.join(ON_UNKNOWN)}.")
    missing = tokenizer.unknown(prompt)
    if missing and on_unknown == "error":
        raise UsageError(
            f"The prompt {prompt!r} contains {len(missing)} character(s) the model's vocabulary lacks: "
            f"{' '.join(repr(ch) for ch in missing)}. Remove them from the prompt, or pass on_unknown=skip "
            "to drop them."
        )
    return tokenizer.encode("".join(ch for ch in prompt if ch not in missing))


def stream(
    model: ShakespeareGenerator,
    tokenizer: Tokenizer,
    prompt: str = "",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    on_unknown: str = "error",
    context: str = "auto",
) -> Iterator[list[str]]:
    """Sample `num_samples` continuations of `prompt` side by side; yields each step's new characters,
    one string per sample. An empty prompt starts from the pad id, the log's "predict from empty input".
    `context` says how the model reads past its sequence_length (`next_character_reader`).

    The options are checked here, before the first step, so bad input fails at the call, not mid-stream.
    """
    check_options(max_new_tokens, temperature, top_k, num_samples, context)
    ids = encode_prompt(tokenizer, prompt, on_unknown)
    if len(ids) == 0:
        ids = torch.tensor([tokenizer.pad_id])
    device = next(model.parameters()).device
    if generator is not None and generator.device != device:
        raise ValueError(f"the generator is on {generator.device} but the model on {device}")
    read = next_character_reader(model, context, num_samples)
    return _steps(model, tokenizer, read, ids.to(device), max_new_tokens, temperature, top_k, num_samples, generator)


@torch.inference_mode()
def _steps(
    model: ShakespeareGenerator,
    tokenizer: Tokenizer,
    read: NextCharacter | SlidingWindow,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    num_samples: int,
    generator: torch.Generator | None,
) -> Iterator[list[str]]:
    V, P = len(tokenizer), len(prompt_ids)
    top_k = None if top_k is None or top_k >= V - 1 else top_k  # the pad id is never a candidate
    ids = torch.empty(num_samples, P + max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    ids[:, :P] = prompt_ids
    decoders = [tokenizer.stream_decoder() for _ in range(num_samples)]  # bytes become text once a character is whole
    was_training = model.training
    model.eval()
    noise = torch.empty(num_samples, V, device=prompt_ids.device)
    try:
        for n in range(P, P + max_new_tokens):
            logits = read(ids[:, :n])  # (B, V)
            logits[:, tokenizer.pad_id] = float("-inf")
            if temperature == 0:  # greedy: the likeliest character, no draw
                next_ids = logits.argmax(dim=-1, keepdim=True)
                ids[:, n : n + 1] = next_ids
                yield [decode(i) for decode, i in zip(decoders, next_ids.view(-1).tolist())]
                continue
            if temperature != 1.0:
                logits /= temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
                logits[logits < kth] = float("-inf")
            # Gumbel-max: argmax(logits - log E), E ~ Exp(1), samples softmax(logits) in fewer steps than multinomial
            noise.exponential_(generator=generator).log_()
            next_ids = (logits - noise).argmax(dim=-1, keepdim=True)  # (B, 1)
            ids[:, n : n + 1] = next_ids
            yield [decode(i) for decode, i in zip(decoders, next_ids.view(-1).tolist())]
        if any(rest := [decode.flush() for decode in decoders]):  # a byte model's unfinished character
            yield rest
    finally:
        model.train(was_training)


def sample(model: ShakespeareGenerator, tokenizer: Tokenizer, prompt: str = "", **options) -> list[str]:
    """The whole texts `stream` would produce (without the prompt), one per sample."""
    texts: list[list[str]] = [[] for _ in range(options.get("num_samples", 1))]
    for chars in stream(model, tokenizer, prompt, **options):
        for text, ch in zip(texts, chars):
            text.append(ch)
    return ["".join(text) for text in texts]
