"""Autoregressive sampling: a trained model writes text, one token (a character, a byte, a BPE token) per step, never
`<|pad|>`; the text streams at token boundaries, a character split over several tokens once it is whole."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
from torch.nn import functional as F

from shakespeare.errors import UsageError
from shakespeare.model.generator import Block, ShakespeareGenerator
from shakespeare.model.sliding_window import SlidingWindow
from shakespeare.ranges import AT_LEAST_0, AT_LEAST_1, TORCH_SEED, Range, check_arguments
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
    after it run for the last position only. The fused twin takes the model's own weights (nothing is
    copied); its own random start, drawn on a forked generator so that the samples' random numbers stay as
    they were, is dropped at once. (Built on the meta device instead, its embeddings' normal_ would import
    torch._dynamo: a second and a half of every generate.py and report.) Its parts are looked up once here,
    not at every step.
    """

    def __init__(self, model: ShakespeareGenerator):
        self.cfg = cfg = model.cfg
        if cfg.attention == "none":  # the bigram reads only the last character anyway
            self.model = model
            return
        with torch.random.fork_rng(devices=[]):
            fused = ShakespeareGenerator(
                dataclasses.replace(cfg, fused_attention=True, dropout=0.0, attention_dropout=0.0)
            )
        state = model.state_dict() if cfg.fused_attention else fuse_heads(model.state_dict())
        fused.load_state_dict(state, assign=True)
        for name, _ in fused.named_buffers():  # not in the state dict (RoPE's angles): the model's own
            module, _, buffer = name.rpartition(".")
            setattr(fused.get_submodule(module), buffer, model.get_buffer(name))
        self.model = fused.eval()
        self.embedding, self.linear, self.ngrams = fused.embedding, fused.linear, fused.ngrams
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
        if self.ngrams is not None:
            x = x + self.ngrams(idx)
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


def next_character_reader(model: ShakespeareGenerator, context: str, num_streams: int) -> NextCharacter | SlidingWindow:
    """What reads the characters so far and gives the next one's logits: the window re-read at every step
    (crop, the function the model was trained on) or the sliding-window cache (slide; auto picks it where the
    model's positions allow it)."""
    if context == "slide" or (context == "auto" and model.cfg.position == "rope" and model.cfg.residual):
        return SlidingWindow(model, num_streams)
    return NextCharacter(model)


# what each sampling option means, as a range: generate.py's keys and the training samples' (GenerationSample)
NewTokens = Annotated[int, AT_LEAST_0]
Temperature = Annotated[
    float,
    Range(
        0,
        math.inf,
        high_open=True,
        means="1 samples the model as trained, lower is safer, 0 always picks the likeliest character",
    ),
]
TopK = Annotated[int, AT_LEAST_1]  # sample among the k likeliest characters (null: among all)
Streams = Annotated[int, AT_LEAST_1]
Seed = Annotated[int, TORCH_SEED]


def check_options(
    max_new_tokens: NewTokens,
    temperature: Temperature,
    top_k: TopK | None,
    num_samples: Streams,
    context: Literal[CONTEXTS] = "auto",
) -> None:
    """Refuse sampling options that have no meaning, naming the value and what it takes."""
    if context not in CONTEXTS:
        raise UsageError(
            f"context={context!r} is not one of {', '.join(CONTEXTS)}: crop re-reads the last sequence_length "
            "characters at every step, slide caches keys and values (rotary rungs), auto picks slide where it can."
        )
    check_arguments(check_options, locals(), "")


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
    """Sample `num_samples` continuations of `prompt` side by side; yields each step's new text (the characters its
    token completes: maybe none, while a character's bytes arrive), one string per sample. An empty prompt starts from the pad id, the log's "predict from empty input".
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
        if any(rest := [decode.flush() for decode in decoders]):  # a byte or BPE model's unfinished character
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
