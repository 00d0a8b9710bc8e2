"""Compression by the model: exact round trips on both context rules and on bytes, a size at the model's own code
length, and every bad input refused in one paragraph with nothing half-written."""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.nn import functional as F

from shakespeare.cli.compress import RANGES, SETTINGS, code
from shakespeare.errors import UsageError
from shakespeare.evaluation import coding
from shakespeare.evaluation.coding import FIXED, MAGIC, SUFFIX, compress_file, decompress_file
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.model.loading import load_generator
from shakespeare.run.composition import CONFIG_DIR
from shakespeare.run.schema import conforms, described
from shakespeare.tokenizer import BYTE_VOCABULARY, ByteTokenizer, CharTokenizer
from tests.harness import ROOT, compose_train, write_corpus
from tests.test_sampling import sliding_window_reference

SMALL = ["data.sequence_length=16", "model.embedding_size=32", "model.num_heads=2", "model.num_blocks=2"]


def trained_checkpoint(path: Path, rung: str, text: bytes, unit: str = "char", steps: int = 150) -> Path:
    """A small `rung` trained for a few AdamW steps on `text`, saved as train.py saves a checkpoint (the parts
    load_generator reads): a model whose predictions are worth coding with, in about a second."""
    cfg = compose_train(path.parent / "compose", [f"model={rung}", *SMALL])
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    tokenizer = ByteTokenizer() if unit == "byte" else CharTokenizer.from_text(text.decode("utf-8"))
    ids = torch.from_numpy(coding.text_ids(tokenizer, text, "corpus"))
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(tokenizer), **settings))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    T = model.cfg.sequence_length
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (32, 1)) + torch.arange(T + 1)
        windows = ids[starts]
        loss = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hparams = {"vocabulary": tokenizer.vocabulary, "model": settings}
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Checkpoints of a rotary rung (context=auto slides), a learned-position rung (it crops) and a byte-level
    rotary rung, each trained briefly on a play-like corpus; and that corpus's characters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as compress.py runs (threads=1): a busy neighbour stalls two threads at every step
    tmp = tmp_path_factory.mktemp("compression")
    corpus = write_corpus(tmp / "corpus.txt").read_bytes()
    yield SimpleNamespace(
        tmp=tmp,
        slide=trained_checkpoint(tmp / "qk_norm.ckpt", "qk_norm", corpus),
        crop=trained_checkpoint(tmp / "block_norm_dropout.ckpt", "block_norm_dropout", corpus),
        byte=trained_checkpoint(tmp / "bytes.ckpt", "qk_norm", corpus, unit="byte", steps=100),
        vocabulary=sorted(set(corpus.decode())),
    )
    torch.set_num_threads(threads)


def compose_compress(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("compress", overrides=list(overrides))


def round_trip(checkpoint: Path, data: bytes, folder: Path, **options) -> tuple[coding.Outcome, coding.Outcome]:
    """Compress `data` and decompress it again with `checkpoint`; both outcomes, the copy checked byte for byte."""
    folder.mkdir(parents=True, exist_ok=True)
    source, packed, copy = folder / "text", folder / f"text{SUFFIX}", folder / "copy"
    source.write_bytes(data)
    model, tokenizer = load_generator(checkpoint)
    compressed = compress_file(model, tokenizer, checkpoint, source, packed, **options)
    model, tokenizer = load_generator(checkpoint)  # a fresh model, as another process would load it
    decompressed = decompress_file(model, tokenizer, checkpoint, packed, copy)
    assert copy.read_bytes() == data
    assert packed.stat().st_size == compressed.file_bytes and not list(folder.glob(".*.part"))
    return compressed, decompressed


def random_text(vocabulary: list[str], n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return "".join(rng.choice(vocabulary) for _ in range(n)).encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("rung, rule", [("slide", "slide"), ("crop", "crop")])
def test_texts_round_trip_exactly_under_both_context_rules(models, rung, rule, tmp_path):
    real = write_corpus(tmp_path / "held_out.txt", n_chars=2_000, seed=1).read_bytes()  # past the context many times
    for name, text in [("real", real), ("random", random_text(models.vocabulary, 1_000)), ("empty", b"")]:
        compressed, decompressed = round_trip(getattr(models, rung), text, tmp_path / name)
        assert compressed.rule == decompressed.rule == rule and compressed.tokens == len(text.decode())
        if name == "real":  # the model learned the play's shape: far below 8 bits a character
            assert compressed.payload_bits / compressed.tokens < 3.5
    assert f"context={rule}" in compressed.summary()


@pytest.mark.slow  # the module's checkpoints train first
def test_a_rotary_rung_crops_on_request_and_a_learned_position_rung_cannot_slide(models, tmp_path):
    text = write_corpus(tmp_path / "t.txt", n_chars=400, seed=3).read_bytes()
    compressed, _ = round_trip(models.slide, text, tmp_path / "crop", context="crop")
    assert compressed.rule == "crop"  # a rotary rung read the cropped way: the file says so, decompression follows
    with pytest.raises(UsageError, match=r"context=slide caches keys .* rotary positions"):
        round_trip(models.crop, text, tmp_path / "slide", context="slide")


@pytest.mark.slow  # the module's checkpoints train first
def test_a_byte_model_compresses_any_file(models, tmp_path):
    rng = random.Random(0)
    data = bytes(rng.randrange(256) for _ in range(1_000)) + b"\xff\xfe\x00 not UTF-8 \xc3" + "ROMEO: é ✓\n".encode()
    compressed, _ = round_trip(models.byte, data, tmp_path / "bytes")
    assert compressed.unit == "byte" and compressed.tokens == compressed.text_bytes == len(data)
    assert "bits per byte" in compressed.summary()


def test_a_bigram_codes_even_a_byte_it_deems_impossible(tmp_path):
    """The bigram reads only the last token (NextCharacter's shortest path); a byte whose probability float32
    rounds to 0 is still coded (the coder gives every symbol some probability) and counted exactly."""
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(BYTE_VOCABULARY), sequence_length=8))
    with torch.no_grad():
        model.embedding.weight[:, 1 + ord("x")] = -200.0  # e^-200: 0 in float32
    hparams = {"vocabulary": BYTE_VOCABULARY, "model": {"sequence_length": 8, "name": "bigram"}}
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, tmp_path / "bigram.ckpt")
    compressed, _ = round_trip(tmp_path / "bigram.ckpt", b"a box of x-rays\x00\xff", tmp_path / "bigram")
    assert compressed.rule == "crop" and math.isfinite(compressed.code_bits)
    assert compressed.code_bits > 2 * 200 / math.log(2) > compressed.payload_bits  # the model's 288 bits an x


def cropped_code_length(model: ShakespeareGenerator, ids: torch.Tensor) -> float:
    """The model's code length in bits for `ids` read the cropped way (the pad id, then the tokens so far, the
    last sequence_length of them), each window through the model's own forward: the reference for the sum
    `encode_tokens` adds up one token at a time through `NextCharacter`."""
    T, read = model.cfg.sequence_length, torch.cat([torch.zeros(1, dtype=torch.long), ids])
    bits = 0.0
    with torch.inference_mode():
        for n in range(len(ids)):
            log_p = torch.log_softmax(model(read[max(0, n + 1 - T) : n + 1][None])[0, -1, 1:], dim=0)
            bits -= float(log_p[ids[n] - 1]) / math.log(2)
    return bits


@pytest.mark.slow
@pytest.mark.parametrize("rung", ["crop", "slide"])
def test_the_file_is_within_1_percent_of_the_models_own_code_length(models, rung, tmp_path):
    text = write_corpus(tmp_path / "held_out.txt", n_chars=5_000, seed=2)
    model, tokenizer = load_generator(getattr(models, rung))
    compressed = compress_file(model, tokenizer, getattr(models, rung), text, tmp_path / "held_out.shkz")
    print(compressed.summary())
    assert compressed.payload_bits <= 1.01 * compressed.code_bits
    assert f"overhead {100 * (compressed.payload_bits / compressed.code_bits - 1):+.3f}%" in compressed.summary()
    assert compressed.file_bytes - compressed.header_bytes == compressed.payload_bits // 8
    ids = tokenizer.encode(text.read_text())
    if rung == "crop":  # the code length reported is the model's own, computed independently (batched), 600 tokens
        short = write_corpus(tmp_path / "short.txt", n_chars=600, seed=4).read_bytes()
        reported, _ = round_trip(models.crop, short, tmp_path / "short")
        reference = cropped_code_length(model, tokenizer.encode(short.decode()))
    else:  # every position at once with banded attention: what the sliding window computes one token at a time
        with torch.inference_mode():
            padded = torch.cat([torch.zeros(1, dtype=torch.long), ids[:799]])[None]
            log_p = torch.log_softmax(sliding_window_reference(model, padded)[0, :, 1:], dim=-1)
            reference = -float(log_p.gather(1, (ids[:800] - 1)[:, None]).sum()) / math.log(2)
        reported, _ = round_trip(models.slide, text.read_bytes()[:800], tmp_path / "short")
    assert reported.code_bits == pytest.approx(reference, rel=1e-4)


# ---- bad input: one paragraph each, exit 2 from the command, nothing half-written


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".part"))


def compressed_file(models, folder: Path, rung: str = "slide", n_chars: int = 800) -> tuple[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    text = write_corpus(folder / "original.txt", n_chars=n_chars, seed=5)
    model, tokenizer = load_generator(getattr(models, rung))
    compress_file(model, tokenizer, getattr(models, rung), text, folder / "packed.shkz")
    return folder / "packed.shkz", text.read_bytes()


def decompress(models, packed: Path, output: Path, rung: str = "slide", **options) -> coding.Outcome:
    model, tokenizer = load_generator(getattr(models, rung))
    return decompress_file(model, tokenizer, getattr(models, rung), packed, output, **options)


@pytest.mark.slow  # the module's checkpoints train first
def test_a_character_model_refuses_unknown_characters_and_non_utf8_up_front(models, tmp_path):
    model, tokenizer = load_generator(models.slide)
    source = tmp_path / "odd.txt"
    source.write_text("ROMEO:\nthe king\nmy lord Zounds ¿ Z\n", encoding="utf-8")
    with pytest.raises(
        UsageError,
        match=r"odd.txt' holds 2 character\(s\) the model's vocabulary lacks: 'Z' '¿' \(the first at line 3, "
        r"column 9\).*byte-level model \(data.unit=byte\)",
    ):
        compress_file(model, tokenizer, models.slide, source, tmp_path / "out.shkz")
    source.write_bytes(b"ROMEO:\nthe \xff king\n")
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 0xff at offset 11 invalid start byte\)"):
        compress_file(model, tokenizer, models.slide, source, tmp_path / "out.shkz")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["odd.txt"]


@pytest.mark.slow  # the module's checkpoints train first
def test_paths_are_checked_before_any_work(models, tmp_path):
    model, tokenizer = load_generator(models.slide)
    text = write_corpus(tmp_path / "a.txt", n_chars=200)
    (tmp_path / "link.txt").symlink_to(text)
    existing = tmp_path / "exists.shkz"
    existing.write_bytes(b"keep me")
    for source, target, message in [
        (tmp_path / "missing.txt", tmp_path / "x.shkz", r"input='.*missing.txt' does not exist"),
        (tmp_path, tmp_path / "x.shkz", r"input='.*' is a folder"),
        (text, text, r"output='.*a.txt' is the input file itself"),
        (text, tmp_path / "link.txt", r"is the input file itself"),
        (text, existing, r"output='.*exists.shkz' exists. Pass overwrite=true"),
        (text, tmp_path, r"is a folder. Name the file to write"),
        (text, tmp_path / "no" / "x.shkz", r"is in a folder that does not exist"),
    ]:
        with pytest.raises(UsageError, match=message):
            compress_file(model, tokenizer, models.slide, source, target)
    assert existing.read_bytes() == b"keep me"
    compress_file(model, tokenizer, models.slide, text, existing, overwrite=True)
    assert existing.read_bytes().startswith(MAGIC)
    with pytest.raises(UsageError, match=r"is the input file itself"):
        decompress_file(model, tokenizer, models.slide, existing, existing, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "exists.shkz", "link.txt"]


@pytest.mark.slow  # the module's checkpoints train first
def test_a_cut_short_damaged_or_foreign_file_is_refused_before_decoding(models, tmp_path):
    packed, _ = compressed_file(models, tmp_path / "ok")
    data = packed.read_bytes()
    header_size = FIXED.size + data[FIXED.size - 2] + 32
    version = len(MAGIC)
    cases = {
        "empty": (b"", r"is cut short: it ends after 0 byte\(s\), inside its header"),
        "in the magic": (data[:5], r"is cut short: it ends after 5 byte\(s\)"),
        "in the header": (data[:60], r"is cut short: it ends after 60 bytes, inside its header"),
        "before the checksum": (data[: header_size - 3], r"is cut short: .* inside its header"),
        "in the payload": (
            data[:-4],
            r"is cut short: its header announces [\d,]+ bytes of coded text and [\d,]+ follow",
        ),
        "joined": (data + data, r"has bytes after its end \(two files joined\?\)"),
        "a text": (
            b"ROMEO:\nthe king\n" * 20,
            r"is not a file compress.py wrote: it does not start with .* magic bytes",
        ),
        "another version": (data[:version] + b"\x07" + data[version + 1 :], r"format version 7; this version .* 1"),
        "a payload byte": (
            data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:],
            r"is damaged: its checksum does not match",
        ),
        "a header byte": (data[:40] + bytes([data[40] ^ 1]) + data[41:], r"is damaged: its checksum does not match"),
    }
    for name, (contents, message) in cases.items():
        bad = tmp_path / "bad.shkz"
        bad.write_bytes(contents)
        with pytest.raises(UsageError, match=message):
            decompress(models, bad, tmp_path / "out.txt")
        assert not (tmp_path / "out.txt").exists() and not leftovers(tmp_path), name


def altered(data: bytes, payload: bytes) -> bytes:
    """A file with another payload and its checksum recomputed: what only the final SHA-256 can catch."""
    n = data[FIXED.size - 2] | data[FIXED.size - 1] << 8
    head = data[: FIXED.size + n]
    return head + hashlib.sha256(head + payload).digest() + payload


@pytest.mark.slow
def test_a_payload_altered_behind_the_checksum_fails_the_texts_sha256_and_writes_nothing(models, tmp_path):
    packed, original = compressed_file(models, tmp_path)
    data = packed.read_bytes()
    n = data[FIXED.size - 2]
    payload = bytearray(data[FIXED.size + n + 32 :])
    payload[len(payload) // 2] ^= 0x40
    packed.write_bytes(altered(data, bytes(payload)))
    output = tmp_path / "out.txt"
    with pytest.raises(UsageError, match=r"did not give back the text it holds .* nothing was written to output"):
        decompress(models, packed, output)
    assert not output.exists() and not leftovers(tmp_path)
    output.write_bytes(b"older")  # an existing output, replaced on request, is kept when the check fails
    with pytest.raises(UsageError, match=r"did not give back the text"):
        decompress(models, packed, output, overwrite=True)
    assert output.read_bytes() == b"older" and not leftovers(tmp_path)
    packed.write_bytes(data)
    decompress(models, packed, output, overwrite=True)
    assert output.read_bytes() == original


@pytest.mark.slow  # the module's checkpoints train first
def test_another_checkpoint_cannot_decompress(models, tmp_path):
    packed, _ = compressed_file(models, tmp_path)
    checkpoint = torch.load(models.slide, weights_only=True)
    checkpoint["state_dict"]["model.linear.bias"][3] += 1e-3  # one weight changed: another model
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    model, tokenizer = load_generator(other)
    with pytest.raises(UsageError, match=r"was compressed with another checkpoint \(SHA-256 [0-9a-f]{16}...\) than"):
        decompress_file(model, tokenizer, other, packed, tmp_path / "out.txt")
    with pytest.raises(UsageError, match=r"another checkpoint"):  # a model of another rung altogether
        decompress(models, packed, tmp_path / "out.txt", rung="crop")
    assert not (tmp_path / "out.txt").exists() and not leftovers(tmp_path)


@pytest.mark.slow  # the module's checkpoints train first
def test_a_machine_that_rounds_differently_is_refused_by_the_fingerprint(models, tmp_path, monkeypatch):
    packed, _ = compressed_file(models, tmp_path)
    exact = coding.probabilities

    def one_ulp_off(logits):  # another CPU's kernels: the same probabilities but for the last bit
        return np.nextafter(exact(logits), np.float32(1))

    monkeypatch.setattr(coding, "probabilities", one_ulp_off)
    with pytest.raises(UsageError, match=r"computes the model's probabilities differently .* fingerprint .* differs"):
        decompress(models, packed, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists() and not leftovers(tmp_path)


@pytest.mark.slow  # the module's checkpoints train first
def test_a_difference_the_probe_misses_is_caught_by_the_final_sha256(models, tmp_path, monkeypatch):
    packed, _ = compressed_file(models, tmp_path, n_chars=1_000)
    exact, calls = coding.probabilities, [0]

    def drifts_later(logits):  # agrees on the probe, then rounds otherwise deep into the text
        calls[0] += 1
        table = exact(logits)
        return table[:, ::-1].copy() if calls[0] > 16 + coding.PROBE + 500 else table

    monkeypatch.setattr(coding, "probabilities", drifts_later)
    with pytest.raises(UsageError, match=r"did not give back the text .* where the fingerprint's probe does not look"):
        decompress(models, packed, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists() and not leftovers(tmp_path)


@pytest.mark.slow  # the module's checkpoints train first
def test_decompression_follows_the_files_context_rule(models, tmp_path):
    packed, original = compressed_file(models, tmp_path)
    with pytest.raises(UsageError, match=r"context=crop differs from the context rule .* \(context=slide\)"):
        decompress(models, packed, tmp_path / "out.txt", context="crop")
    assert decompress(models, packed, tmp_path / "out.txt", context="slide").rule == "slide"
    assert (tmp_path / "out.txt").read_bytes() == original


# ---- the command


@pytest.mark.slow  # the module's checkpoints train first
def test_the_command_compresses_decompresses_and_names_the_output_itself(models, tmp_path):
    text = write_corpus(tmp_path / "notes.txt", n_chars=500, seed=6)
    out = io.StringIO()
    outcome = code(compose_compress(f"ckpt_path={models.crop}", f"input={text}"), out)
    packed = tmp_path / "notes.txt.shkz"
    assert outcome.target == packed and packed.is_file()
    summary = out.getvalue()
    assert "bits per character" in summary and "overhead" in summary and "characters/s" in summary
    text.rename(tmp_path / "kept.txt")
    code(compose_compress("mode=decompress", f"ckpt_path={models.crop}", f"input={packed}"), io.StringIO())
    assert text.read_bytes() == (tmp_path / "kept.txt").read_bytes()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], r"ckpt_path is not set"),
        (["ckpt_path=CKPT"], r"input is not set"),
        (
            ["ckpt_path=CKPT", "input=TEXT", "mode=squeeze"],
            r"mode='squeeze' is refused: mode takes one of compress, decompress",
        ),
        (["ckpt_path=CKPT", "input=TEXT", "threads=0"], r"threads=0 must be a whole number of at least 1"),
        (
            ["ckpt_path=CKPT", "input=TEXT", "context=window"],
            r"context='window' is refused: .* one of auto, crop, slide",
        ),
        (["ckpt_path=CKPT", "input=TEXT", "overwrite=maybe"], r"overwrite='maybe' is refused"),
        (["ckpt_path=CKPT", "input=TEXT", "mode=decompress"], r"output is not set, and input=.* does not end in .shkz"),
        (["ckpt_path=TMP/none.ckpt", "input=TEXT"], r"ckpt_path='.*none.ckpt' does not exist"),
        (["ckpt_path=TMP/foreign.ckpt", "input=TEXT"], r"is a PyTorch file but not a checkpoint of this project"),
        (["ckpt_path=TMP/cut.ckpt", "input=TEXT"], r"cannot be read: it is cut short or not a PyTorch checkpoint"),
        (["ckpt_path=last", f"log_dir={Path('TMP') / 'no_runs'}", "input=TEXT"], r"ckpt_path=last found no run"),
    ],
)
@pytest.mark.slow  # the module's checkpoints train first
def test_the_command_refuses_bad_settings_and_checkpoints(models, overrides, message, tmp_path):
    text = write_corpus(tmp_path / "notes.txt", n_chars=100)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(models.slide.read_bytes()[:1000])
    cfg = [
        o.replace("CKPT", str(models.slide)).replace("TEXT", str(text)).replace("TMP", str(tmp_path)) for o in overrides
    ]
    with pytest.raises(UsageError, match=message):
        code(compose_compress(*cfg), io.StringIO())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cut.ckpt", "foreign.ckpt", "notes.txt"]


def test_every_key_is_typed_and_every_number_ranged():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        values = OmegaConf.to_container(compose("compress"), resolve=True)
    leaves = described(values, SETTINGS, RANGES)
    assert {leaf.key for leaf in leaves} == set(SETTINGS)
    for leaf in leaves:
        if conforms(12345, leaf.kind):
            assert leaf.rule is not None, f"{leaf.key} takes a number: declare its Range"


def run_compress(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "compress.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_command_end_to_end(models, tmp_path):
    shutil.copy(models.crop, tmp_path / "model.ckpt")
    text = write_corpus(tmp_path / "notes.txt", n_chars=2_000, seed=7)
    result = run_compress(["ckpt_path=model.ckpt", "input=notes.txt", "output=notes.z"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bits per character" in result.stdout and "characters/s" in result.stdout
    result = run_compress(["mode=decompress", "ckpt_path=model.ckpt", "input=notes.z", "output=copy.txt"], tmp_path)
    assert result.returncode == 0 and "SHA-256 verified" in result.stdout, result.stderr
    assert (tmp_path / "copy.txt").read_bytes() == text.read_bytes()
    result = run_compress(["mode=decompress", "ckpt_path=model.ckpt", "input=notes.z", "output=copy.txt"], tmp_path)
    assert (
        result.returncode == 2 and "exists. Pass overwrite=true" in result.stderr and "Traceback" not in result.stderr
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy.txt", "model.ckpt", "notes.txt", "notes.z"]
    result = run_compress(["--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("python compress.py ckpt_path=<run folder or .ckpt>")
    assert "\noverwrite: false" in result.stdout and "powered by Hydra" not in result.stdout


def test_the_byte_vocabulary_is_the_byte_tokenizers():  # the byte ids the coder maps straight to bytes
    assert coding.text_ids(ByteTokenizer(), b"\x00\xff", "x").tolist() == [1, 256]
    assert BYTE_VOCABULARY[1] == "<0x00>" and coding.text_bytes(ByteTokenizer())(np.array([1, 256])) == b"\x00\xff"
