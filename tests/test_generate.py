"""The generate command and the checkpoint it reads: safe loading, clear errors, samples during training."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shakespeare.cli.generate import write_samples
from shakespeare.cli.train import fit
from shakespeare.errors import UsageError
from shakespeare.model.loading import load_generator
from shakespeare.tokenizer import PAD
from shakespeare.training.callbacks import GenerationSample
from tests.harness import (
    ROOT,
    compose_generate,
    compose_train,
    write_corpus,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained for two short epochs; its corpus is deleted afterwards."""
    tmp = tmp_path_factory.mktemp("generate")
    corpus = write_corpus(tmp / "corpus.txt")
    cfg = compose_train(
        tmp / "run",
        [
            f"data.path={corpus}",
            "model=block_norm_dropout",
            "data.batch_size=32",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=20",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
            "callbacks.generation_sample.max_new_tokens=50",
            "optimizer.lr=0.01",
        ],
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fit(cfg)
    vocabulary = sorted(set(corpus.read_text()))
    corpus.unlink()
    return SimpleNamespace(
        folder=tmp / "run",
        best=tmp / "run" / "checkpoints" / "best.ckpt",
        stdout=out.getvalue(),
        vocabulary=vocabulary,
        tmp=tmp,
    )


@pytest.mark.slow  # trains runs (or reads a trained one) end to end
def test_the_checkpoint_alone_rebuilds_the_model_with_weights_only_loading(run):
    checkpoint = torch.load(run.best, weights_only=True)
    assert checkpoint["hyper_parameters"]["vocabulary"] == [PAD, *run.vocabulary]
    model, tokenizer = load_generator(run.folder)  # a run folder means its best checkpoint; the corpus is gone
    assert not model.training and tokenizer.vocabulary == [PAD, *run.vocabulary]
    assert model.cfg.name == "block_norm_dropout" and model.cfg.dropout == 0.1
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, checkpoint["state_dict"][f"model.{name}"])


def test_generate_streams_the_prompt_and_its_continuation(run):
    out = io.StringIO()
    texts = write_samples(
        compose_generate(f"ckpt_path={run.best}", "prompt=ROMEO:", "max_new_tokens=80", "seed=3"), out
    )
    assert out.getvalue() == f"ROMEO:{texts[0]}\n" and len(texts[0]) == 80 and PAD not in texts[0]
    again = write_samples(
        compose_generate(f"ckpt_path={run.folder}", "prompt=ROMEO:", "max_new_tokens=80", "seed=3"), io.StringIO()
    )
    assert again == texts
    out = io.StringIO()
    write_samples(compose_generate(f"ckpt_path={run.best}", r'prompt="ROMEO:\nO lord"', "max_new_tokens=3"), out)
    assert out.getvalue().startswith("ROMEO:\nO lord")
    out = io.StringIO()
    texts = write_samples(
        compose_generate(f"ckpt_path={run.best}", "num_samples=3", "max_new_tokens=30", "top_k=5"), out
    )
    assert len(set(texts)) == 3 and out.getvalue().count("---------- Sample ") == 3


def test_a_sample_is_logged_to_tensorboard_every_epoch_and_printed_at_the_end(run):
    events = EventAccumulator(str(run.folder), size_guidance={"tensors": 0})
    events.Reload()
    samples = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("generation/empty_input/text_summary")]
    assert len(samples) == 2  # one per validation epoch, none for the sanity check
    for markdown in samples:
        text = markdown.replace("\n    ", "\n").removeprefix("    ")
        assert len(text) == 50 and PAD not in text
    assert f"Generation:\n---------- Predict from empty input:\n{text}\n" in run.stdout


@pytest.mark.slow
def test_the_sample_callback_leaves_training_randomness_alone(tiny_cfg):
    with_samples = fit(tiny_cfg("model=block_norm_dropout"))
    without = fit(tiny_cfg("model=block_norm_dropout", "~callbacks.generation_sample"))
    assert with_samples["val/loss"] == without["val/loss"]


def test_the_sample_callback_uses_its_own_generator(run):
    model, tokenizer = load_generator(run.best)
    module = SimpleNamespace(model=model.train(), tokenizer=tokenizer, device=torch.device("cpu"))
    state = torch.get_rng_state()
    callback = GenerationSample(max_new_tokens=20)
    trainer = SimpleNamespace(sanity_checking=False, loggers=[], global_step=0)
    callback.on_validation_epoch_end(trainer, module)
    assert torch.equal(torch.get_rng_state(), state) and len(callback.text) == 20
    with pytest.raises(UsageError, match="temperature=-1 must be a finite number of at least 0"):
        GenerationSample(temperature=-1)


class Foreign:
    pass


def test_bad_checkpoints_are_named_with_what_was_expected(run, tmp_path):
    with pytest.raises(UsageError, match=r"ckpt_path='.*nothing.ckpt' does not exist"):
        load_generator(tmp_path / "nothing.ckpt")
    with pytest.raises(UsageError, match=r"is a folder without checkpoints/best.ckpt"):
        load_generator(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run.best.read_bytes()[:5000])
    with pytest.raises(
        UsageError, match=r"truncated.ckpt' cannot be read: it is cut short or not a PyTorch checkpoint at all"
    ):
        load_generator(truncated)
    (tmp_path / "text.ckpt").write_text("ROMEO: not a checkpoint")
    with pytest.raises(UsageError, match=r"text.ckpt' cannot be read: it is cut short or not a PyTorch checkpoint"):
        load_generator(tmp_path / "text.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    with zipfile.ZipFile(run.best) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():  # a valid zip whose tensor data is cut short
            target.writestr(item, source.read(item)[:7] if "/data/" in item.filename else source.read(item))
    with pytest.raises(
        UsageError, match=r"damaged.ckpt' cannot be read: torch cannot read its records: it is damaged or truncated"
    ):
        load_generator(damaged)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    with pytest.raises(UsageError, match=r"other.ckpt' is a PyTorch file but not a checkpoint of this project"):
        load_generator(tmp_path / "other.ckpt")
    torch.save({"object": Foreign()}, tmp_path / "pickled.ckpt")
    with pytest.raises(
        UsageError, match=r"pickled.ckpt' cannot be read: it holds Python objects \(tests.test_generate.Foreign\)"
    ):
        load_generator(tmp_path / "pickled.ckpt")
    checkpoint = torch.load(run.best, weights_only=True)
    checkpoint["hyper_parameters"]["model"]["embedding_size"] *= 2
    torch.save(checkpoint, tmp_path / "mismatch.ckpt")
    with pytest.raises(UsageError, match=r"mismatch.ckpt' has weights that do not fit the model"):
        load_generator(tmp_path / "mismatch.ckpt")


def test_generate_refuses_bad_options(run):
    for override, message in [
        ("prompt=ROMEO:QX", r"The prompt 'ROMEO:QX' contains 2 character\(s\) the model's vocabulary lacks: 'Q' 'X'"),
        ("max_new_tokens=-5", "max_new_tokens=-5 must be"),
        ("temperature=-0.1", "temperature=-0.1 must be a finite number of at least 0"),
        ("top_k=0", "top_k=0 must be a whole number of at least 1"),
        ("device=tpu", "device='tpu' is not available on this machine"),
        ("context=slide", "context=slide caches keys .* rotary positions .* Use context=crop"),  # learned positions
        ("context=window", "context='window' .* auto, crop, slide"),
    ]:
        with pytest.raises(UsageError, match=message):
            write_samples(compose_generate(f"ckpt_path={run.best}", override), io.StringIO())
    with pytest.raises(UsageError, match="ckpt_path is not set"):
        write_samples(compose_generate(), io.StringIO())
    out = io.StringIO()
    write_samples(
        compose_generate(f"ckpt_path={run.best}", "prompt=ROMEO:QX", "on_unknown=skip", "max_new_tokens=5"), out
    )
    assert out.getvalue().startswith("ROMEO:") and len(out.getvalue()) == len("ROMEO:") + 5 + 1


def run_generate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "generate.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_generate_cli_end_to_end(run, tmp_path):
    result = run_generate([f"ckpt_path={run.folder}", "prompt=ROMEO:", "max_new_tokens=100", "seed=1"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) == len("ROMEO:") + 100 + 1
    assert list(tmp_path.iterdir()) == []  # generating writes nothing to disk
    assert "| lightning" not in result.stderr  # importing Lightning alone would double the start-up time
    result = run_generate([f"ckpt_path={run.best}", "temperature=-1"], tmp_path)
    assert result.returncode == 2 and "\ntemperature=-1 must be a finite number of at least 0" in result.stderr
    assert "Traceback" not in result.stderr


def control_character_writer(path: Path) -> Path:
    """A byte-level bigram whose every step writes a control byte (ESC, SO, NUL, BEL, DEL), newline, tab or the
    first byte of U+009B (C1), which it always completes: a checkpoint as train.py writes one."""
    from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
    from shakespeare.tokenizer import BYTE_VOCABULARY

    model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(BYTE_VOCABULARY), sequence_length=8))
    with torch.no_grad():
        logits = torch.full((257, 257), -30.0)
        logits[:, [1 + b for b in (0x00, 0x07, 0x0E, 0x1B, 0x7F, 0x0A, 0x09, 0xC2)]] = 0.0
        logits[1 + 0xC2] = -30.0
        logits[1 + 0xC2, 1 + 0x9B] = 0.0  # U+009B in UTF-8: C2 9B
        model.embedding.weight.copy_(logits)
    hparams = {"vocabulary": BYTE_VOCABULARY, "model": {"sequence_length": 8, "name": "bigram"}}
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def controls(text: str) -> set[str]:
    return {ch for ch in text if (ord(ch) < 32 and ch not in "\n\t") or 0x7F <= ord(ch) <= 0x9F}


def test_a_byte_models_control_characters_are_escaped_on_the_terminal_and_kept_on_request(tmp_path):
    checkpoint = control_character_writer(tmp_path / "controls.ckpt")
    shown = io.StringIO()
    write_samples(compose_generate(f"ckpt_path={checkpoint}", "max_new_tokens=300"), out=shown)
    assert not controls(shown.getvalue()) and "\\x1b" in shown.getvalue() and "\\x9b" in shown.getvalue()
    raw = io.StringIO()
    write_samples(compose_generate(f"ckpt_path={checkpoint}", "max_new_tokens=300", "raw=true"), out=raw)
    assert controls(raw.getvalue()) >= {"\x1b", "\x0e", "\x00", "\x07", "\x7f", "\x9b"}  # exactly as sampled
    samples = io.StringIO()
    write_samples(compose_generate(f"ckpt_path={checkpoint}", "max_new_tokens=50", "num_samples=2"), out=samples)
    assert not controls(samples.getvalue())


def test_the_sample_at_the_end_of_training_escapes_control_characters(tmp_path, capsys):
    model, tokenizer = load_generator(control_character_writer(tmp_path / "controls.ckpt"))
    module = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    GenerationSample(max_new_tokens=300).on_train_end(SimpleNamespace(progress_bar_callback=None), module)
    out = capsys.readouterr().out
    assert "Predict from empty input" in out and not controls(out) and "\\x1b" in out


def test_ckpt_path_last_writes_with_the_newest_runs_best_checkpoint(run, tmp_path):
    import shutil

    outputs = tmp_path / "outputs"
    for when, folder in (
        (1_000, "2026-01-01/10-00-00-000000_old"),
        (2_000, "multiruns/2026-01-02/09-00-00-000000/0_new"),
    ):
        best = outputs / folder / "checkpoints" / "best.ckpt"
        best.parent.mkdir(parents=True)
        shutil.copy(run.best, best)
        os.utime(best, (when, when))
    newest = outputs / "multiruns/2026-01-02/09-00-00-000000/0_new/checkpoints/best.ckpt"
    from shakespeare.run.folders import checkpoint_of

    assert checkpoint_of("last", outputs) == newest
    assert (
        len(
            write_samples(compose_generate("ckpt_path=last", f"log_dir={outputs}", "max_new_tokens=7"), io.StringIO())[
                0
            ]
        )
        == 7
    )
    with pytest.raises(UsageError, match=r"ckpt_path=last found no run to write with: .*Train one first"):
        write_samples(compose_generate("ckpt_path=last", f"log_dir={tmp_path / 'none'}"), io.StringIO())
