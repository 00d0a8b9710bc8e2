"""Sampling: reproducible, never pad, runs past the context, refuses meaningless options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.model.sampling import (
    NextCharacter,
    next_character_reader,
    sample,
    stream,
)
from shakespeare.model.sliding_window import SlidingWindow
from shakespeare.tokenizer import PAD, CharTokenizer
from tests.harness import ROOT, ROTARY_RUNGS, compose_train, fast_first, rotary_model

TOKENIZER = CharTokenizer.from_text("ROMEO:\nJULIET: the king my lord, good sweet love!")


def make_model(attention: str = "multihead", sequence_length: int = 8, **extra) -> ShakespeareGenerator:
    torch.manual_seed(0)
    cfg = GeneratorConfig(
        vocab_size=len(TOKENIZER),
        sequence_length=sequence_length,
        attention=attention,
        embedding_size=16,
        num_heads=2,
        **extra,
    )
    return ShakespeareGenerator(cfg)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_text_other_seed_other_text():
    model = make_model(residual=True, feed_forward=True, layer_norm=True, dropout=0.2)
    one = sample(model, TOKENIZER, "ROMEO:", max_new_tokens=60, generator=seeded(1))
    assert one == sample(model, TOKENIZER, "ROMEO:", max_new_tokens=60, generator=seeded(1))
    assert one != sample(model, TOKENIZER, "ROMEO:", max_new_tokens=60, generator=seeded(2))
    assert len(one) == 1 and len(one[0]) == 60 and set(one[0]) <= set(TOKENIZER.vocabulary)
    assert model.training  # dropout was off while sampling, and the mode is given back


def test_num_samples_are_independent_streams():
    texts = sample(make_model(), TOKENIZER, "", max_new_tokens=40, num_samples=4, generator=seeded(0))
    assert len(texts) == 4 and len(set(texts)) == 4 and all(len(t) == 40 for t in texts)


@pytest.mark.parametrize("attention", ["none", "multihead"])
def test_a_model_that_loves_pad_never_emits_it(attention):
    model = make_model(attention)
    with torch.no_grad():
        if attention == "none":
            model.embedding.weight[:, TOKENIZER.pad_id] = 1e4
        else:
            model.linear.bias[TOKENIZER.pad_id] = 1e4
    for top_k in (None, 1, 3):
        for text in sample(model, TOKENIZER, "", max_new_tokens=50, num_samples=3, top_k=top_k, generator=seeded(0)):
            assert len(text) == 50 and PAD not in text


def test_generation_runs_past_the_context_by_cropping_it():
    model = make_model(sequence_length=8)
    long_prompt = "JULIET: the king my lord"  # longer than the context of 8
    text = sample(model, TOKENIZER, long_prompt, max_new_tokens=100, generator=seeded(3))[0]
    assert len(text) == 100
    # only the last 8 characters of the prompt can matter
    assert text == sample(model, TOKENIZER, long_prompt[-8:], max_new_tokens=100, generator=seeded(3))[0]


def test_top_k_1_is_greedy():
    model = make_model()
    greedy = sample(model, TOKENIZER, "ROMEO:", max_new_tokens=20, top_k=1, generator=seeded(0))[0]
    assert greedy == sample(model, TOKENIZER, "ROMEO:", max_new_tokens=20, top_k=1, generator=seeded(9))[0]
    ids = TOKENIZER.encode("ROMEO:")[None]
    with torch.no_grad():
        model.eval()
        for _ in range(20):
            logits = model(ids[:, -8:])[:, -1]
            logits[:, 0] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert greedy == TOKENIZER.decode(ids[0, 6:])


def test_stream_yields_as_it_goes():
    steps = stream(make_model(), TOKENIZER, "", max_new_tokens=5, num_samples=2, generator=seeded(0))
    first = next(steps)
    assert len(first) == 2 and all(len(ch) == 1 for ch in first)
    assert len(list(steps)) == 4


def test_unknown_prompt_characters_are_listed_or_skipped():
    model = make_model()
    with pytest.raises(UsageError, match=r"2 character\(s\) the model's vocabulary lacks: 'Z' '¿'.*on_unknown=skip"):
        stream(model, TOKENIZER, "ROMEO: Z¿Z", max_new_tokens=5)
    skipped = sample(model, TOKENIZER, "ROMEO: Z¿Z", max_new_tokens=30, on_unknown="skip", generator=seeded(0))
    assert skipped == sample(model, TOKENIZER, "ROMEO: ", max_new_tokens=30, generator=seeded(0))
    with pytest.raises(UsageError, match="on_unknown='drop' is not one of error, skip"):
        stream(model, TOKENIZER, "R", on_unknown="drop")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_new_tokens": -1}, "max_new_tokens=-1 must be a whole number of at least 0"),
        (
            {"temperature": -0.5},
            r"temperature=-0.5 must be a finite number of at least 0 \(1 samples the model .* 0 always picks the likeliest",
        ),
        ({"temperature": float("inf")}, "temperature=inf must be a finite number of at least 0"),
        ({"top_k": 0}, "top_k=0 must be a whole number of at least 1"),
        ({"num_samples": 0}, "num_samples=0 must be a whole number of at least 1"),
    ],
)
def test_meaningless_options_are_refused_before_any_step(options, message):
    with pytest.raises(UsageError, match=message):
        stream(make_model(), TOKENIZER, "R", **options)


def test_zero_new_tokens_is_empty():
    assert sample(make_model(), TOKENIZER, "ROMEO:", max_new_tokens=0) == [""]


@pytest.mark.parametrize(
    "rung, overrides",
    [(rung, []) for rung in ["bigram", "qk_norm"]]
    + [("multihead_ffn", ["model.fused_attention=true"])]
    + [  # the other rungs in the full suite: each composes a config
        pytest.param(rung, overrides, marks=pytest.mark.slow)
        for rung, overrides in [
            *[(rung, []) for rung in ["head", "block_norm_dropout"]],
            *[(rung, []) for rung in ["multihead", "multihead_ffn", "block", "block_norm", "rmsnorm", "rope", "relu2"]],
            ("block_norm_dropout", ["experiment=scale_up", "model.num_blocks=2", "model.feed_forward_size=96"]),
            ("block_norm", ["model.fused_attention=true", "model.num_blocks=3"]),
            ("qk_norm", ["model.num_blocks=3", "model.feed_forward_size=64", "data.sequence_length=16"]),
        ]
    ],
)
def test_next_character_is_the_models_last_position_in_fewer_steps(rung, overrides, tmp_path):
    cfg = compose_train(tmp_path, [f"model={rung}", *overrides])
    model = ShakespeareGenerator(
        GeneratorConfig(vocab_size=66, **OmegaConf.to_container(cfg.model, resolve=True))
    ).eval()
    state = torch.get_rng_state()
    next_character = NextCharacter(model)
    assert torch.equal(torch.get_rng_state(), state)  # built around the model's weights, nothing drawn
    if rung != "bigram":
        assert "AttentionHead" not in repr(next_character) and "Dropout" not in repr(next_character)
    T = model.cfg.sequence_length
    for length in (1, T // 2, T):
        idx = torch.randint(1, 66, (3, length))
        torch.testing.assert_close(next_character(idx), model(idx)[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # starts a process
def test_building_the_fused_twin_imports_no_compiler(tmp_path):
    """The twin's random start (drawn, then dropped) must not go through torch._dynamo: built on the meta device,
    an embedding's normal_ imported it, a second and a half of every generate.py and report."""
    script = (
        "import sys, torch\n"
        "from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator\n"
        "from shakespeare.model.sampling import NextCharacter\n"
        "cfg = GeneratorConfig(vocab_size=66, attention='multihead', embedding_size=16, num_heads=2, residual=True,"
        " layer_norm=True, num_blocks=1, sequence_length=8)\n"
        "NextCharacter(ShakespeareGenerator(cfg).eval())\n"
        "assert 'torch._dynamo' not in sys.modules, 'the fused twin imported torch._dynamo'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)


def sliding_window_reference(model: ShakespeareGenerator, idx: torch.Tensor) -> torch.Tensor:
    """Every position's logits (B, L, V) when each attends to itself and the T - 1 positions before it, all
    computed at once: what the cache must give one character at a time."""
    T, L = model.cfg.sequence_length, idx.shape[1]
    distance = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    band = (distance >= 0) & (distance < T)  # (L, L): query row, key column
    x = model.embedding(idx) + (0.0 if model.ngrams is None else model.ngrams(idx))
    for block in model.blocks[:-1]:
        attention, h = block.heads, block.norm1(x)
        B, _, C = h.shape
        q, k, v = attention.qkv(h).view(B, L, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attention.queries_keys(q, k)  # positions 0 .. L-1, past the rotary table
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
        x = x + attention.projection(y.transpose(1, 2).reshape(B, L, C))
        x = x + block.feed_forward(block.norm2(x))
    return model.linear(model.blocks[-1](x))


@pytest.mark.parametrize("rung, overrides", fast_first(ROTARY_RUNGS[2:] + ROTARY_RUNGS[:2], keep=2))
@torch.inference_mode()
def test_the_sliding_window_is_the_models_own_function_up_to_its_context(rung, overrides, tmp_path):
    model = rotary_model(rung, overrides, tmp_path)
    T = model.cfg.sequence_length
    for prompt_length in (1, 3, T):
        idx = torch.randint(1, 66, (3, T))
        window = SlidingWindow(model, num_streams=3)
        for n in range(prompt_length, T + 1):  # the prompt at once, then one character a call
            torch.testing.assert_close(window(idx[:, :n]), model(idx[:, :n])[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rung, overrides", fast_first(ROTARY_RUNGS[2:] + ROTARY_RUNGS[:2], keep=2))
@torch.inference_mode()
def test_past_its_context_the_sliding_window_attends_to_the_last_T_positions(rung, overrides, tmp_path):
    model = rotary_model(rung, overrides, tmp_path)
    T = model.cfg.sequence_length
    idx = torch.randint(1, 66, (2, 3 * T + 3))  # the ring of T slots wraps round three times
    expected = sliding_window_reference(model, idx)
    for prompt_length in (2, T + 5):  # a prompt longer than the context too
        window = SlidingWindow(model, num_streams=2)
        for n in range(prompt_length, idx.shape[1] + 1):
            torch.testing.assert_close(window(idx[:, :n]), expected[:, n - 1], atol=1e-4, rtol=1e-4)
    assert all(len(block.heads.rotary.turns) == T for block in model.blocks[:-1])  # the model is left as it was
    cropped = NextCharacter(model)(idx)
    torch.testing.assert_close(cropped, model(idx[:, -T:])[:, -1], atol=1e-5, rtol=1e-5)
    if model.cfg.num_blocks == 1 and model.ngrams is None:  # one layer attends to T positions from the characters
        torch.testing.assert_close(cropped, expected[:, -1], atol=1e-4, rtol=1e-4)
    else:  # re-reading the window is another function past T: later layers' cached positions saw further back, and
        # the window's first n-grams lose the characters before it
        assert not torch.allclose(cropped, expected[:, -1], atol=1e-3)


def test_auto_slides_where_positions_rotate_and_crops_where_they_are_learned(tmp_path):
    rotary, learned = rotary_model("qk_norm", [], tmp_path), rotary_model("block_norm_dropout", [], tmp_path)
    assert isinstance(next_character_reader(rotary, "auto", 1), SlidingWindow)
    assert isinstance(next_character_reader(rotary, "crop", 1), NextCharacter)
    assert isinstance(next_character_reader(learned, "auto", 1), NextCharacter)
    with pytest.raises(UsageError, match="context=slide .* rotary positions .* context=crop"):
        stream(learned, TOKENIZER, "ROMEO:", context="slide")
    with pytest.raises(UsageError, match="context='window' is not one of auto, crop, slide"):
        stream(rotary, TOKENIZER, "ROMEO:", context="window")


def test_sliding_and_cropped_samples_agree_while_the_text_fits_the_context(tmp_path):
    model = rotary_model("qk_norm", [], tmp_path, sequence_length=32)
    tokenizer = CharTokenizer([PAD, *(chr(c) for c in range(33, 33 + 65))])  # 66 ids, as the model's vocabulary
    options = dict(max_new_tokens=24, num_samples=2)
    slid = sample(model, tokenizer, "AB", generator=seeded(3), context="slide", **options)
    assert slid == sample(model, tokenizer, "AB", generator=seeded(3), context="crop", **options)
    longer = dict(options, max_new_tokens=120)
    assert sample(model, tokenizer, "AB", generator=seeded(3), context="slide", **longer)[0][:24] == slid[0]


def test_temperature_0_always_picks_the_likeliest_character():
    model = make_model()
    greedy = sample(model, TOKENIZER, "R", max_new_tokens=30, temperature=0, num_samples=2)
    assert greedy[0] == greedy[1]  # no draw: every stream the same
    with torch.inference_mode():
        ids = TOKENIZER.encode("R").tolist()
        for ch in greedy[0]:
            logits = model(torch.tensor([ids[-model.cfg.sequence_length :]]))[0, -1]
            logits[TOKENIZER.pad_id] = float("-inf")
            assert TOKENIZER.vocabulary[int(logits.argmax())] == ch
            ids.append(TOKENIZER.vocabulary.index(ch))
