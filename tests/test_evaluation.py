"""What a loss means: a run's held-out text scored once per character, statically and adaptively (prequential),
beside the compressors' code length of the same text; recorded in the run folder."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.nn import functional as F

from shakespeare.cli.evaluate import evaluate_checkpoint
from shakespeare.cli.train import fit
from shakespeare.errors import UsageError
from shakespeare.evaluation.scoring import Adaptation, adaptive_code_length, segments, static_code_length
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.run.composition import CONFIG_DIR
from tests.harness import compose_train, train_like_hydra, write_corpus

TINY = [
    "model=rope",
    "model.embedding_size=16",
    "model.num_heads=2",
    "model.num_blocks=1",
    "data.sequence_length=16",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "callbacks.generation_sample.max_new_tokens=0",
    "optimizer.lr=0.01",
]


def compose_evaluate(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(tmp / "corpus.txt")
    train_like_hydra(tmp / "run", [f"data.path={corpus}", *TINY, "data.test_fraction=0.05"])
    return tmp / "run"


def test_segments_score_every_held_out_token_once_each_with_the_context_before_it():
    ids = torch.arange(100)
    for length, context in ((16, 16), (8, 16), (5, 16)):
        scored = []
        for x, y, n in segments(ids, 40, length, context):
            assert len(x) == len(y) <= context and torch.equal(y, x + 1)  # y follows x, one token on
            scored += y[-n:].tolist()
        assert scored == list(range(40, 100))


def test_the_static_code_length_is_the_models_cross_entropy_of_every_held_out_token():
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=20, sequence_length=8, attention="head"))
    ids = torch.randint(1, 20, (50,))
    expected = sum(F.cross_entropy(model(x[None])[0], y, reduction="sum").item() for x, y, _ in segments(ids, 13, 8, 8))
    scored = static_code_length(model, ids, 13, batch_size=2)
    assert scored.tokens == 37 and scored.nats == pytest.approx(expected, rel=1e-5)
    assert scored.bits_per_char == pytest.approx(scored.nats_per_char / math.log(2))


@pytest.mark.parametrize("step", ["sgd", "rms"])
def test_learning_as_it_reads_lowers_the_code_length_of_a_repetitive_text(step):
    torch.manual_seed(0)
    model = ShakespeareGenerator(
        GeneratorConfig(
            vocab_size=12, sequence_length=16, attention="multihead", embedding_size=16, num_heads=2, feed_forward=True
        )
    )
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] * 60)  # a phrase the model never learned, over and over
    before = [p.clone() for p in model.parameters()]
    static = static_code_length(model, ids, 300)
    adaptive = adaptive_code_length(
        model, ids, 300, Adaptation(step=step, lr=0.5 if step == "sgd" else 0.003, segment=8)
    )
    assert adaptive.nats_per_char < static.nats_per_char - 0.2  # it learns the phrase as it goes
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the model passed in is untouched


@pytest.mark.slow
def test_evaluate_prints_and_records_static_adaptive_and_the_compressors(run):
    out = io.StringIO()
    evaluation = evaluate_checkpoint(compose_evaluate(f"ckpt_path={run}", "adapt=true", "threads=1"), out)
    text = out.getvalue()
    assert "this model, static" in text and "adaptive (prequential" in text and "PPMd -o6 -m256" in text
    assert set(evaluation.yardsticks) == {"gzip -9", "bzip2 -9", "xz -9e", "zstd -22", "PPMd -o6 -m256"}
    recorded = json.loads((run / "evaluation.json").read_text())["val"]
    assert recorded["static"] == evaluation.static and recorded["prequential"] == evaluation.prequential
    section = (run / "research_log.md").read_text().split("## Evaluation")[1]
    assert "static (each character once)" in section and "prequential" in section
    test = evaluate_checkpoint(compose_evaluate(f"ckpt_path={run}", "split=test", "threads=1"), io.StringIO())
    assert test.prequential is None and test.characters < evaluation.characters  # the last 5%, after validation
    assert set(json.loads((run / "evaluation.json").read_text())) == {"val", "test"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt_path=null"], "ckpt_path is not set"),
        (["adapt=true", "adaptation.lr=0"], r"adaptation.lr=0 must be a number above 0"),
        (["adapt=true", "adaptation.step=adam"], r"adaptation.step='adam' is refused: .* takes one of sgd, rms"),
        (
            ["data_path=/nonexistent/text.txt"],
            r"cannot be read here: data.path='/nonexistent/text.txt' does not exist.* data_path=",
        ),
    ],
)
def test_bad_evaluation_settings_are_named(overrides, message, run):
    overrides = [f"ckpt_path={run}", *overrides] if not overrides[0].startswith("ckpt_path") else overrides
    with pytest.raises(UsageError, match=message):
        evaluate_checkpoint(compose_evaluate(*overrides), io.StringIO())


@pytest.mark.slow  # trains
def test_a_run_without_a_test_split_or_held_out_text_says_so(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    fit(compose_train(tmp_path / "windows", [f"data.path={corpus}", *TINY, "data.split=random_windows"]))
    with pytest.raises(UsageError, match=r"data.split=random_windows, whose validation windows overlap"):
        evaluate_checkpoint(compose_evaluate(f"ckpt_path={tmp_path / 'windows'}"), io.StringIO())
    with pytest.raises(UsageError, match=r"no test split .*data.test_fraction"):
        evaluate_checkpoint(compose_evaluate(f"ckpt_path={tmp_path / 'windows'}", "split=test"), io.StringIO())


def test_an_adaptation_that_throws_the_weights_off_is_refused_naming_the_rate():
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=12, sequence_length=16, attention="head"))
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] * 60)
    with pytest.raises(
        UsageError, match=r"adaptation.lr=1e\+06 is too large for this model: .* e.g. adaptation.lr=100000"
    ):
        adaptive_code_length(model, ids, 300, Adaptation(lr=1e6, segment=8))


@pytest.mark.slow
def test_the_report_puts_each_run_on_the_compressors_scale(run):
    from shakespeare.report.__main__ import write_report

    evaluate_checkpoint(compose_evaluate(f"ckpt_path={run}", "adapt=true", "threads=1"), io.StringIO())
    table, _, _ = write_report(run, sample_length=0)
    section = table.split("## What the losses mean")[1]
    names = ["gzip -9", "bzip2 -9", "xz -9e", "zstd -22", "PPMd -o6 -m256"]
    assert all(f"| {name} (given the training text) |" in section for name in names)
    best = [line for line in section.splitlines() if "best eval loss" in line]
    adaptive = [line for line in section.splitlines() if "adaptive, prequential (evaluate.py)" in line]
    assert len(best) == len(adaptive) == 1 and ("better than" in best[0] or "worse than" in best[0])
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and "---" not in line and "nats/" not in line
    ]
    figures = [float(row.split(" | ")[1]) for row in rows]
    assert figures == sorted(figures, reverse=True)  # one scale, the best last


def test_the_adaptations_defaults_are_the_commands():
    from dataclasses import asdict

    assert dict(compose_evaluate().adaptation) == asdict(Adaptation())  # one set of tuned settings


@pytest.mark.slow  # trains runs (or reads a trained one) end to end
def test_the_compressors_scale_shows_a_configuration_trained_with_several_seeds_once(run, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from shakespeare.report.__main__ import write_report

    for seed in (1, 2):  # the same run twice, differing only in its seed
        copy = shutil.copytree(run, tmp_path / f"seed-{seed}")
        config = OmegaConf.load(copy / ".hydra" / "config.yaml")
        config.seed = seed
        OmegaConf.save(config, copy / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create([f"seed={seed}"]), copy / ".hydra" / "overrides.yaml")
    section = write_report(tmp_path, sample_length=0)[0].split("## What the losses mean")[1]
    best = [line for line in section.splitlines() if "best eval loss" in line]
    assert len(best) == 1 and best[0].startswith("| rope (2 seeds, mean): best eval loss |")
