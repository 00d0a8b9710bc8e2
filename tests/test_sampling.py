"""Sampling: reproducible, never pad, runs past the context, refuses meaningless options."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from shakespeare.errors import UsageError
from shakespeare.model import GeneratorConfig, ShakespeareGenerator
from shakespeare.sampling import NextCharacter, sample, stream
from shakespeare.tokenizer import PAD, CharTokenizer
from tests.conftest import compose_train

TOKENIZER = CharTokenizer.from_text("ROMEO:\nJULIET: the king my lord, good sweet love!")


def make_model(attention: str = "multihead", sequence_length: int = 8, **extra) -> ShakespeareGenerator:
    torch.manual_seed(0)
    cfg = GeneratorConfig(
        vocab_size=len(TOKENIZER), sequence_length=sequence_length, attention=attention, embedding_size=16,
        num_heads=2, **extra,
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
        ({"temperature": 0}, "temperature=0 must be greater than 0"),
        ({"temperature": -0.5}, "temperature=-0.5 must be greater than 0"),
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
    [(rung, []) for rung in ["bigram", "head", "multihead", "multihead_ffn", "block", "block_norm", "block_norm_dropout"]]
    + [
        ("block_norm_dropout", ["experiment=scale_up", "model.num_blocks=2", "model.feed_forward_size=96"]),
        ("block_norm", ["model.fused_attention=true", "model.num_blocks=3"]),
        ("multihead_ffn", ["model.fused_attention=true"]),
        *[(rung, []) for rung in ["rmsnorm", "rope", "relu2", "qk_norm"]],
        ("qk_norm", ["model.num_blocks=3", "model.feed_forward_size=64", "data.sequence_length=16"]),
    ],
)
def test_next_character_is_the_models_last_position_in_fewer_steps(rung, overrides, tmp_path):
    cfg = compose_train(tmp_path, [f"model={rung}", *overrides])
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=66, **OmegaConf.to_container(cfg.model, resolve=True))).eval()
    state = torch.get_rng_state()
    next_character = NextCharacter(model)
    assert torch.equal(torch.get_rng_state(), state)  # built around the model's weights, nothing drawn
    if rung != "bigram":
        assert "AttentionHead" not in repr(next_character) and "Dropout" not in repr(next_character)
    T = model.cfg.sequence_length
    for length in (1, T // 2, T):
        idx = torch.randint(1, 66, (3, length))
        torch.testing.assert_close(next_character(idx), model(idx)[:, -1], atol=1e-5, rtol=1e-5)
