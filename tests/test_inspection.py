"""Seeing inside a rung: attention weights from a side pass, loss by position, character embeddings, and
each of them read back through a real TensorBoard server."""

from __future__ import annotations

import io
import urllib.parse
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from shakespeare.cli.train import fit
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.model.sampling import fuse_heads
from shakespeare.tokenizer import ByteTokenizer, CharTokenizer
from shakespeare.training.inspection import (
    LossByPosition,
    attention_layers,
    attention_maps,
    held_out_passage,
    position_tags,
    token_label,
)
from shakespeare.training.tags import LOSS_BY_POSITION
from tests.harness import tensorboard

RUNGS = {  # the rung settings that change where attention sits
    "head": dict(attention="head"),
    "multihead": dict(attention="multihead"),
    "block_norm_dropout": dict(
        attention="multihead", feed_forward=True, residual=True, layer_norm=True, dropout=0.1, num_blocks=2
    ),
}


def build(rung: str, **settings) -> ShakespeareGenerator:
    return ShakespeareGenerator(GeneratorConfig(vocab_size=66, sequence_length=8, **RUNGS[rung], **settings))


@pytest.mark.parametrize("rung", RUNGS)
def test_fused_attention_shows_the_weights_of_the_per_head_modules(rung):
    """The fused path never builds its weights; its `attention_weights` gives those the log's heads compute."""
    per_head = build(rung).eval()
    fused = build(rung, fused_attention=True)
    fused.load_state_dict(fuse_heads(per_head.state_dict()))
    passage = torch.randint(1, 66, (8,))
    maps, fused_maps = attention_maps(per_head, passage), attention_maps(fused, passage)
    heads, layers = (1, 1) if rung == "head" else (4, per_head.cfg.num_blocks)
    assert [weights.shape for _, weights in maps] == [(heads, 8, 8)] * layers
    for (title, weights), (fused_title, fused_weights) in zip(maps, fused_maps):
        assert title == fused_title
        torch.testing.assert_close(fused_weights, weights, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(heads, 8))  # each row a distribution
        assert not weights.triu(1).any()  # causal: nothing from later positions


@pytest.mark.parametrize("variant", [{}, {"position": "rope"}, {"position": "rope", "qk_norm": True}])
def test_fused_weights_are_what_its_forward_applies(variant):
    """scaled_dot_product_attention with these weights, by hand, gives the fused module's output, the
    rotary and QK-norm variants' (which position and normalise queries and keys first) included."""
    cfg = GeneratorConfig(
        vocab_size=10,
        sequence_length=6,
        attention="multihead",
        embedding_size=12,
        num_heads=3,
        residual=True,
        fused_attention=True,
        **variant,
    )
    attention = ShakespeareGenerator(cfg).blocks[0].heads.eval()
    x = torch.randn(2, 6, 12)
    _, _, v = attention.split_heads(x)
    mixed = (attention.attention_weights(x) @ v).transpose(1, 2).reshape(2, 6, 12)  # (B, T, C)
    torch.testing.assert_close(attention.projection(mixed), attention(x), atol=1e-5, rtol=1e-5)


def test_the_side_pass_leaves_the_model_as_it_was():
    model = build("block_norm_dropout").train()
    idx = torch.randint(1, 66, (3, 8))
    before = model.eval()(idx)
    model.train()
    maps = attention_maps(model, idx[0])
    assert model.training and not any(m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model.eval()(idx), before)
    assert [title for title, _ in maps] == ["block 0", "block 1"]
    assert attention_layers(ShakespeareGenerator(GeneratorConfig(vocab_size=66, sequence_length=8))) == []  # the bigram


def test_loss_by_position_averages_each_position_over_all_batches():
    metric = LossByPosition(4)
    first, second = torch.rand(3, 4), torch.rand(5, 4)
    metric.update(first)
    metric.update(second)
    torch.testing.assert_close(metric.compute(), torch.cat([first, second]).mean(dim=0))
    assert position_tags(12, LOSS_BY_POSITION)[:2] == [f"{LOSS_BY_POSITION}/01", f"{LOSS_BY_POSITION}/02"]


def test_the_passage_starts_a_line_when_the_windows_slide_by_one():
    text = "ab.\n\nKING:\nO my lord, what"
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    windows = ids.unfold(0, 8, 1)  # consecutive windows, as the contiguous split serves them
    assert tokenizer.decode(held_out_passage(windows, tokenizer)) == "KING:\nO "
    jumping = windows[::3]  # not consecutive: no way to tell what precedes a window
    assert tokenizer.decode(held_out_passage(jumping, tokenizer)) == "ab.\n\nKIN"


def test_labels_make_invisible_characters_visible():
    assert [token_label(token) for token in [" ", "\n", "\t", "a", "<|pad|>", "\x0b"]] == [
        "␣",
        "⏎",
        "⇥",
        "a",
        "<|pad|>",
        "\\x0b",
    ]
    assert [token_label(token) for token in ["<0x0A>", "<0x20>", "<0x41>", "<0xC3>"]] == [
        "⏎",
        "␣",
        "A",
        "<0xC3>",
    ]  # bytes


def test_the_passage_starts_a_line_in_bytes_too():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("ab.\n\nKING:\nO my lord, what")
    assert tokenizer.decode(held_out_passage(ids.unfold(0, 8, 1), tokenizer)) == "KING:\nO "


@pytest.mark.slow  # trains
def test_validation_logs_the_loss_at_each_position(tiny_cfg):
    """Every position's mean, averaged over the window, is the epoch's validation loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(
        "model=multihead",
        "trainer.max_epochs=2",
        "callbacks.inspection.attention=false",
        "callbacks.inspection.embeddings=false",
    )
    fit(cfg)
    events = EventAccumulator(cfg.paths.output_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    by_position = [[e.value for e in events.Scalars(tag)] for tag in position_tags(8, LOSS_BY_POSITION)]
    val = [e.value for e in events.Scalars("val/loss")]
    assert len(val) == 2 and all(len(values) == 2 for values in by_position)
    assert np.mean(by_position, axis=0) == pytest.approx(val, rel=1e-5)
    assert events.Tags()["images"] == []  # switched off: no pictures
    assert not (Path(cfg.paths.output_dir) / "projector_config.pbtxt").exists()


@pytest.mark.slow
def test_tensorboard_server_shows_attention_loss_by_position_and_embeddings(tiny_cfg):
    cfg = tiny_cfg("model=block_norm", "model.num_blocks=2", "trainer.max_epochs=2")
    fit(cfg)
    run = Path(cfg.paths.output_dir)
    with tensorboard(run.parent, ready_tag=f"{LOSS_BY_POSITION}/1") as get:
        assert list(get("/images/tags")["run"]) == ["inspection/attention"]
        query = urllib.parse.urlencode({"run": "run", "tag": "inspection/attention"})
        grids = get(f"/images/images?{query}")
        assert len(grids) == 2  # one per validation
        pictures = [
            matplotlib.image.imread(io.BytesIO(get(f"/images/individualImage?{g['query']}", raw=True)), format="png")
            for g in grids
        ]
        assert (
            pictures[0].shape == pictures[1].shape and pictures[0].shape[1] > pictures[0].shape[0]
        )  # 2 rows of 4 heads
        assert not np.array_equal(pictures[0], pictures[1])  # the weights moved with training

        tags = [tag for tag in get("/scalars/tags")["run"] if tag.startswith(LOSS_BY_POSITION)]
        assert sorted(tags) == position_tags(8, LOSS_BY_POSITION)
        curve = [
            get("/scalars/scalars?" + urllib.parse.urlencode({"run": "run", "tag": tag}))[-1][2] for tag in sorted(tags)
        ]
        val = get("/scalars/scalars?" + urllib.parse.urlencode({"run": "run", "tag": "val/loss"}))[-1][2]
        assert np.mean(curve) == pytest.approx(val, rel=1e-5) and all(0 < loss < 10 for loss in curve)
        [category] = get("/custom_scalars/layout")["category"]  # all positions in one chart
        [chart] = category["chart"]
        assert category["title"] == "loss by position" and chart["multiline"]["tag"] == [f"^{LOSS_BY_POSITION}/"]
        query = urllib.parse.urlencode({"run": "run", "tag": chart["multiline"]["tag"][0]})
        lines = get(f"/custom_scalars/scalars?{query}")
        assert sorted(lines["tag_to_events"]) == position_tags(8, LOSS_BY_POSITION)

        assert get("/projector/runs") == ["run"]
        [embedding] = get("/projector/info?run=run")["embeddings"]
        name = embedding["tensorName"]
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        table = checkpoint["state_dict"]["model.embedding.weight"]
        assert embedding["tensorShape"] == list(table.shape)
        tensor = np.frombuffer(
            get("/projector/tensor?" + urllib.parse.urlencode({"run": "run", "name": name}), raw=True), np.float32
        )
        np.testing.assert_allclose(tensor.reshape(table.shape), table.numpy(), rtol=1e-4, atol=1e-6)  # the final table
        labels = (
            get("/projector/metadata?" + urllib.parse.urlencode({"run": "run", "name": name}), raw=True)
            .decode()
            .splitlines()
        )
        vocabulary = checkpoint["hyper_parameters"]["vocabulary"]
        assert labels == [token_label(ch) for ch in vocabulary] and {"␣", "⏎", ":", "."} <= set(labels)
