"""Every rung builds the research log's module tree and computes what the log's modules compute."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from shakespeare.errors import UsageError
from shakespeare.model.generator import (
    GeneratorConfig,
    NGramEmbedding,
    ReLUSquared,
    Rotary,
    ShakespeareGenerator,
)
from tests.harness import compose_train, fast_first

# The trees printed in the research log, verbatim (vocabulary of 66, sequence length 8).
LOG_TREES = {
    "bigram": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 66, padding_idx=0)
)""",
    "head": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (positional_embedding): Embedding(8, 32)
  (head): AttentionHead(
    (query): Linear(in_features=32, out_features=32, bias=False)
    (key): Linear(in_features=32, out_features=32, bias=False)
    (value): Linear(in_features=32, out_features=32, bias=False)
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)""",
    "multihead": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (positional_embedding): Embedding(8, 32)
  (heads): MultiHeadAttention(
    (heads): ModuleList(
      (0-3): 4 x AttentionHead(
        (query): Linear(in_features=32, out_features=8, bias=False)
        (key): Linear(in_features=32, out_features=8, bias=False)
        (value): Linear(in_features=32, out_features=8, bias=False)
      )
    )
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)""",
    "multihead_ffn": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (positional_embedding): Embedding(8, 32)
  (heads): MultiHeadAttention(
    (heads): ModuleList(
      (0-3): 4 x AttentionHead(
        (query): Linear(in_features=32, out_features=8, bias=False)
        (key): Linear(in_features=32, out_features=8, bias=False)
        (value): Linear(in_features=32, out_features=8, bias=False)
      )
    )
  )
  (feed_forward): FeedForward(
    (linear): Linear(in_features=32, out_features=32, bias=True)
    (gelu): GELU(approximate='none')
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)""",
    "block": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (positional_embedding): Embedding(8, 32)
  (blocks): Sequential(
    (0): Block(
      (heads): MultiHeadAttention(
        (heads): ModuleList(
          (0-3): 4 x AttentionHead(
            (query): Linear(in_features=32, out_features=8, bias=False)
            (key): Linear(in_features=32, out_features=8, bias=False)
            (value): Linear(in_features=32, out_features=8, bias=False)
          )
        )
        (projection): Linear(in_features=32, out_features=32, bias=True)
      )
      (feed_forward): FeedForward(
        (linear): Linear(in_features=32, out_features=32, bias=True)
        (gelu): GELU(approximate='none')
        (projection): Linear(in_features=32, out_features=32, bias=True)
      )
    )
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)""",
    "block_norm": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (positional_embedding): Embedding(8, 32)
  (blocks): Sequential(
    (0): Block(
      (norm1): LayerNorm((32,), eps=1e-05, elementwise_affine=True)
      (heads): MultiHeadAttention(
        (heads): ModuleList(
          (0-3): 4 x AttentionHead(
            (query): Linear(in_features=32, out_features=8, bias=False)
            (key): Linear(in_features=32, out_features=8, bias=False)
            (value): Linear(in_features=32, out_features=8, bias=False)
          )
        )
        (projection): Linear(in_features=32, out_features=32, bias=True)
      )
      (norm2): LayerNorm((32,), eps=1e-05, elementwise_affine=True)
      (feed_forward): FeedForward(
        (linear): Linear(in_features=32, out_features=32, bias=True)
        (gelu): GELU(approximate='none')
        (projection): Linear(in_features=32, out_features=32, bias=True)
      )
    )
    (1): LayerNorm((32,), eps=1e-05, elementwise_affine=True)
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)""",
    "block_norm_dropout": """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (positional_embedding): Embedding(8, 32)
  (blocks): Sequential(
    (0): Block(
      (norm1): LayerNorm((32,), eps=1e-05, elementwise_affine=True)
      (heads): MultiHeadAttention(
        (heads): ModuleList(
          (0-3): 4 x AttentionHead(
            (query): Linear(in_features=32, out_features=8, bias=False)
            (key): Linear(in_features=32, out_features=8, bias=False)
            (value): Linear(in_features=32, out_features=8, bias=False)
            (dropout): Dropout(p=0.1, inplace=False)
          )
        )
        (projection): Linear(in_features=32, out_features=32, bias=True)
        (dropout): Dropout(p=0.1, inplace=False)
      )
      (norm2): LayerNorm((32,), eps=1e-05, elementwise_affine=True)
      (feed_forward): FeedForward(
        (linear): Linear(in_features=32, out_features=32, bias=True)
        (gelu): GELU(approximate='none')
        (projection): Linear(in_features=32, out_features=32, bias=True)
        (dropout): Dropout(p=0.1, inplace=False)
      )
    )
    (1): LayerNorm((32,), eps=1e-05, elementwise_affine=True)
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)""",
}

ROPE_TREE = """\
ShakespeareGenerator(
  (embedding): Embedding(66, 32)
  (blocks): Sequential(
    (0): Block(
      (norm1): RMSNorm((32,), eps=None, elementwise_affine=True)
      (heads): RotaryAttention(
        num_heads=4, attention_dropout=0.1
        (qkv): Linear(in_features=32, out_features=96, bias=False)
        (projection): Linear(in_features=32, out_features=32, bias=True)
        (dropout): Dropout(p=0.1, inplace=False)
        (rotary): Rotary(head_size=8, base=10000)
      )
      (norm2): RMSNorm((32,), eps=None, elementwise_affine=True)
      (feed_forward): FeedForward(
        (linear): Linear(in_features=32, out_features=32, bias=True)
        (gelu): GELU(approximate='none')
        (projection): Linear(in_features=32, out_features=32, bias=True)
        (dropout): Dropout(p=0.1, inplace=False)
      )
    )
    (1): RMSNorm((32,), eps=None, elementwise_affine=True)
  )
  (linear): Linear(in_features=32, out_features=66, bias=True)
)"""

# Each modern rung's tree is the tree of the rung it extends with exactly these lines changed.
MODERN_TREES = {
    "rmsnorm": (
        "block_norm_dropout",
        {"LayerNorm((32,), eps=1e-05, elementwise_affine=True)": "RMSNorm((32,), eps=None, elementwise_affine=True)"},
    ),
    "rope": ("rmsnorm", None),  # ROPE_TREE: rotary attention (fused), no position embedding
    "relu2": ("rope", {"(gelu): GELU(approximate='none')": "(relu2): ReLUSquared()"}),
    "qk_norm": (
        "relu2",
        {
            "(heads): RotaryAttention(": "(heads): QKNormAttention(",
            "(rotary): Rotary(head_size=8, base=10000)\n": "(rotary): Rotary(head_size=8, base=10000)\n"
            "        (query_norm): RMSNorm((8,), eps=None, elementwise_affine=True)\n"
            "        (key_norm): RMSNorm((8,), eps=None, elementwise_affine=True)\n",
        },
    ),
}


def expected_tree(rung: str) -> str:
    if rung in LOG_TREES:
        return LOG_TREES[rung]
    before, changes = MODERN_TREES[rung]
    if changes is None:
        return ROPE_TREE
    tree = expected_tree(before)
    for old, new in changes.items():
        assert old in tree
        tree = tree.replace(old, new)
    return tree


def build(rung: str, tmp_path, *overrides: str) -> ShakespeareGenerator:
    cfg = compose_train(tmp_path, [f"model={rung}", *overrides])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return ShakespeareGenerator(GeneratorConfig(vocab_size=66, **model))


@pytest.mark.parametrize("rung", fast_first(list(LOG_TREES), keep=2))
def test_rung_prints_the_logs_tree(rung, tmp_path):
    printed = re.sub(r"(LayerNorm\(.*), bias=True\)", r"\1)", repr(build(rung, tmp_path)))  # PyTorch >= 2.1 adds bias=
    assert printed == LOG_TREES[rung]


@pytest.mark.parametrize("rung", fast_first(["qk_norm", "rmsnorm", "rope", "relu2"]))  # qk_norm builds on all
def test_modern_rung_prints_the_tree_of_the_rung_before_with_its_one_change(rung, tmp_path):
    assert repr(build(rung, tmp_path)) == expected_tree(rung)


@pytest.mark.parametrize(
    "rung",
    [
        rung if rung in ("head", "block_norm_dropout", "qk_norm") else pytest.param(rung, marks=pytest.mark.slow)
        for rung in [*LOG_TREES, *MODERN_TREES]
    ],  # three rungs in the fast suite, every rung in the slow one
)
def test_rung_is_causal(rung, tmp_path):
    """Changing a later character never changes the logits at earlier positions."""
    model = build(rung, tmp_path).eval()
    idx = torch.randint(1, 66, (2, 8))
    changed = idx.clone()
    changed[:, 5:] = torch.randint(1, 66, (2, 3))
    torch.testing.assert_close(model(idx)[:, :5], model(changed)[:, :5])


def test_scale_up_tree_has_eight_heads_of_eight(tmp_path):
    model = build("block_norm_dropout", tmp_path, "experiment=scale_up")
    assert "(0-7): 8 x AttentionHead" in repr(model)
    assert "Linear(in_features=64, out_features=8, bias=False)" in repr(model)
    assert model.positional_embedding.num_embeddings == 64


def test_num_blocks_stacks_blocks_before_the_final_norm(tmp_path):
    model = build("block_norm", tmp_path, "model.num_blocks=3")
    assert [type(m).__name__ for m in model.blocks] == ["Block", "Block", "Block", "LayerNorm"]


def test_attention_head_matches_the_formula():
    cfg = GeneratorConfig(vocab_size=10, sequence_length=4, attention="head", embedding_size=6)
    head = ShakespeareGenerator(cfg).head
    x = torch.randn(1, 4, 6)
    q, k, v = head.query(x), head.key(x), head.value(x)
    scores = (q @ k.transpose(1, 2)) / 6**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(4, 4), 1).bool(), float("-inf"))
    torch.testing.assert_close(head(x), scores.softmax(-1) @ v)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"num_heads": 3}, "model.num_heads=3"),
        ({"embedding_size": 0}, "model.embedding_size=0"),
        ({"dropout": 1.0}, "model.dropout=1.0"),
        ({"attention": "cross"}, "model.attention='cross'"),
        ({"residual": True, "attention": "head"}, "model.residual=true"),
    ],
)
def test_bad_model_values_are_named(overrides, named):
    base = dict(vocab_size=66, sequence_length=8, attention="multihead", embedding_size=32, num_heads=4)
    with pytest.raises(UsageError, match=named.replace("(", r"\(")):
        GeneratorConfig(**{**base, **overrides})


def fused_state(per_head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head weights under the fused names: `heads.heads.2.key.weight` -> rows of `heads.qkv.weight`,
    every head's query rows first, then the keys, then the values."""
    fused, parts = {}, {}
    for name, tensor in per_head.items():
        match = re.fullmatch(r"(.+?)(?:\.heads\.(\d+))?\.(query|key|value)\.weight", name)
        if match is None:
            fused[name] = tensor
        else:
            parts.setdefault(match[1], {}).setdefault(match[3], []).append((int(match[2] or 0), tensor))
    for module, qkv in parts.items():
        rows = [tensor for part in ("query", "key", "value") for _, tensor in sorted(qkv[part], key=lambda p: p[0])]
        fused[f"{module}.qkv.weight"] = torch.cat(rows)
    return fused


@pytest.mark.parametrize(
    "rung, overrides",
    [("block_norm_dropout", [])]
    + [  # the other rungs in the full suite: each composes a config
        pytest.param(rung, overrides, marks=pytest.mark.slow)
        for rung, overrides in [
            *[(rung, []) for rung in ["head", "multihead_ffn", "multihead", "block", "block_norm", "rmsnorm"]],
            ("block_norm_dropout", ["experiment=scale_up", "model.num_blocks=2"]),
        ]
    ],
)
def test_fused_attention_computes_the_per_head_function(rung, overrides, tmp_path):
    per_head = build(rung, tmp_path, *overrides).eval()
    fused = build(rung, tmp_path, *overrides, "model.fused_attention=true").eval()
    fused.load_state_dict(fused_state(per_head.state_dict()))  # strict: every weight has its place
    idx = torch.randint(1, 66, (4, per_head.cfg.sequence_length))
    torch.testing.assert_close(fused(idx), per_head(idx), atol=1e-5, rtol=1e-5)
    assert "AttentionHead" not in repr(fused) and "FusedAttention" in repr(fused)


def test_feed_forward_size_widens_the_blocks_hidden_layer(tmp_path):
    model = build("block_norm", tmp_path, "model.feed_forward_size=128")
    assert (
        model.blocks[0].feed_forward.linear.out_features == 128
        and model.blocks[0].feed_forward.projection.in_features == 128
    )
    with pytest.raises(UsageError, match="model.feed_forward_size=128 needs model.residual=true"):
        build("multihead_ffn", tmp_path, "model.feed_forward_size=128")


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    rotary = Rotary(head_size=8, sequence_length=16)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_at: int, key_at: int) -> torch.Tensor:
        queries, keys = q.expand(1, 1, 16, 8), k.expand(1, 1, 16, 8)
        rotated_q, rotated_k = rotary(queries, keys)
        return rotated_q[0, 0, query_at] @ rotated_k[0, 0, key_at]

    torch.testing.assert_close(score(5, 2), score(13, 10))
    torch.testing.assert_close(score(3, 3), q[0, 0, 0] @ k[0, 0, 0])  # no distance, no rotation
    assert not torch.allclose(score(5, 2), score(5, 4))
    last_q, all_k = rotary(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 10, 8))  # queries: the last 3 of 10 positions
    assert last_q.shape == (2, 1, 3, 8) and all_k.shape == (2, 1, 10, 8)
    long_q, long_k = rotary(q.expand(1, 1, 40, 8), k.expand(1, 1, 40, 8))  # past the 16 positions of its table
    torch.testing.assert_close(long_q[0, 0, 35] @ long_k[0, 0, 32], score(5, 2))


def test_rope_rungs_have_no_position_embedding_and_still_see_order(tmp_path):
    model = build("rope", tmp_path).eval()
    assert not any("positional" in name for name, _ in model.named_parameters())
    idx = torch.randint(1, 66, (1, 8))
    swapped = idx[:, [1, 0, *range(2, 8)]]
    assert not torch.allclose(model(idx)[:, -1], model(swapped)[:, -1])  # the order of the first two still matters


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(tmp_path):
    model = build("qk_norm", tmp_path).eval()
    idx = torch.randint(1, 66, (2, 8))
    before = model(idx)
    with torch.no_grad():
        model.blocks[0].heads.qkv.weight[:64] *= 10  # the query and key rows
    torch.testing.assert_close(model(idx), before, atol=1e-4, rtol=1e-4)


def test_ngram_rung_adds_one_table_per_n_to_the_muon_rungs_tree(tmp_path):
    cfg = compose_train(tmp_path, ["rung=ngram", "data.sequence_length=8"])
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=66, **OmegaConf.to_container(cfg.model, resolve=True)))
    muon = compose_train(tmp_path, ["rung=muon", "data.sequence_length=8"])
    plain = ShakespeareGenerator(GeneratorConfig(vocab_size=66, **OmegaConf.to_container(muon.model, resolve=True)))
    tree = (
        "  (embedding): Embedding(66, 32)\n"
        "  (ngrams): NGramEmbedding(\n"
        "    ngrams=2..3, rows=[4489, 16384]\n"
        "    (tables): ModuleList(\n"
        "      (0): Embedding(4489, 32)\n"
        "      (1): Embedding(16384, 32)\n"
        "    )\n"
        "  )\n"
    )
    assert repr(model) == repr(plain).replace("  (embedding): Embedding(66, 32)\n", tree)
    assert cfg.optimizer._target_ == muon.optimizer._target_
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["ngrams.tables.0.weight", "ngrams.tables.1.weight"]
    idx = torch.randint(1, 66, (2, 8))
    torch.testing.assert_close(model.eval()(idx), plain.eval()(idx))  # the tables start at zero: the muon rung


@torch.no_grad()
def test_an_ngram_embedding_reads_the_n_characters_ending_at_its_position_and_no_others():
    ngrams = NGramEmbedding(vocab_size=66, embedding_size=4, ngrams=3, buckets=16384)
    for table in ngrams.tables:
        torch.nn.init.normal_(table.weight)
    idx = torch.randint(1, 66, (3, 12))
    changed = idx.clone()
    changed[:, 5] = idx[:, 5] % 65 + 1  # another character at position 5
    moved = (ngrams(idx) != ngrams(changed)).any(dim=-1).any(dim=0)  # (T,)
    assert moved.nonzero().flatten().tolist() == [5, 6, 7]  # the 1-, 2- and 3-grams that hold it
    at_the_start = ngrams(idx[:, :3])  # before the window's start: no character, not position T - 1's
    torch.testing.assert_close(at_the_start, ngrams(idx)[:, :3])


def test_ngrams_have_a_row_each_where_they_fit_and_spread_over_the_rows_where_they_do_not():
    exact = NGramEmbedding(vocab_size=5, embedding_size=1, ngrams=2, buckets=1000)
    with torch.no_grad():
        exact.tables[0].weight[:, 0] = torch.arange(exact.rows[0], dtype=torch.float)
    pairs = torch.cartesian_prod(torch.arange(5), torch.arange(5))  # every 2-gram, and every first character
    rows = torch.cat([exact(pairs)[:, 1, 0], exact(pairs)[:, 0, 0]]).unique()
    assert exact.rows == [36] and len(rows) == 25 + 5  # 25 2-grams and 5 "window starts with c": one row each

    hashed = NGramEmbedding(vocab_size=66, embedding_size=1, ngrams=3, buckets=1024)
    with torch.no_grad():
        hashed.tables[1].weight[:, 0] = torch.arange(1024, dtype=torch.float)
    triples = torch.randint(1, 66, (4096, 3))
    used = hashed(triples)[:, 2, 0].unique().numel()
    expected = 1024 * (1 - (1 - 1 / 1024) ** len(triples.unique(dim=0)))  # rows a random hash would use
    assert hashed.rows == [1024, 1024] and used > 0.95 * expected


def test_relu2_is_relu_squared():
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(ReLUSquared()(x), torch.where(x > 0, x * x, torch.zeros_like(x)))


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"norm": "batch"}, "model.norm='batch' is not one of layer, rms"),
        ({"activation": "tanh"}, "model.activation='tanh' is not one of gelu, relu2"),
        ({"position": "rope"}, "model.position=rope .* needs model.residual=true"),
        (
            {"position": "rope", "residual": True},
            "needs model.fused_attention=true .* Drop model.fused_attention=false",
        ),
        (
            {"qk_norm": True, "residual": True, "fused_attention": True},
            "model.qk_norm=true .* needs model.position=rope",
        ),
    ],
)
def test_bad_modern_options_are_named(overrides, named):
    base = dict(vocab_size=66, sequence_length=8, attention="multihead", embedding_size=32, num_heads=4)
    with pytest.raises(UsageError, match=named):
        GeneratorConfig(**{**base, **overrides})
