"""Tokens past characters: a byte-level BPE (data.unit=bpe) trained on the training text alone, cached and stored in
checkpoints as plain data; every unit holds out the same characters, and every held-out loss reads as bits per
character of that text; generation, inspection, the memory estimate and the report work with a larger vocabulary."""

from __future__ import annotations

import io
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import pre_tokenizers

from shakespeare.cli.evaluate import evaluate_checkpoint
from shakespeare.cli.generate import write_samples
from shakespeare.cli.train import fit
from shakespeare.data import token_cache
from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.model.loading import load_generator
from shakespeare.model.memory import step_memory
from shakespeare.model.sampling import sample
from shakespeare.model.sliding_window import SlidingWindow
from shakespeare.report.runs import Run
from shakespeare.report.tables import markdown_table, units_table
from shakespeare.run.checks import check_config
from shakespeare.tokenizer import (
    PAD,
    BPETokenizer,
    TokenizerError,
    byte_level_alphabet,
    lead_bytes,
    printable,
    tokenizer_for,
)
from shakespeare.training.inspection import LEFT_LABELS, attention_grid, bytes_label, token_labels
from shakespeare.training.module import ShakespeareModule
from tests.harness import compose_generate, compose_train, fast_first, write_corpus
from tests.test_evaluation import compose_evaluate

ACCENTED = "KING HENRY:\nŒuvre naïve, ☃ déjà vu — señor! I'll go.\n\nJULIET:\nΩ thou art fair, ümlaut and ß.\n\n"


def play(path: Path, n_chars: int = 20_000) -> str:
    """The synthetic play with accented lines among its speeches: characters and bytes differ."""
    text = write_corpus(path, n_chars).read_text()
    lines = text.splitlines(keepends=True)
    text = "".join(line + (ACCENTED if i % 40 == 0 else "") for i, line in enumerate(lines))
    path.write_text(text, encoding="utf-8")
    return text


def data(path: Path, unit: str = "bpe", vocab_size: int | None = 300, **kwargs) -> ShakespeareDataModule:
    vocab_size = vocab_size if unit == "bpe" else None
    dm = ShakespeareDataModule(
        path=str(path), cache_dir=str(path.parent / "cache"), unit=unit, vocab_size=vocab_size, **kwargs
    )
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return play(tmp_path_factory.mktemp("play") / "play.txt")


@pytest.fixture(scope="module")
def bpe(text) -> BPETokenizer:
    return BPETokenizer.train(iter([text]), vocab_size=300)


def test_a_bpe_is_byte_level_with_the_pad_first_and_spells_every_text(text, bpe):
    assert len(bpe) == 300 and bpe.vocabulary[0] == PAD and bpe.pad_id == 0 and bpe.unit == "bpe"
    assert sorted(byte_level_alphabet()) == sorted(pre_tokenizers.ByteLevel.alphabet())  # the library's alphabet
    for sample_text in (text[:700], "Ω ☃ 𝄞 never seen \x00\x1b", ""):
        assert bpe.unknown(sample_text) == [] and bpe.decode(bpe.encode(sample_text)) == sample_text
        ids = bpe.encode(sample_text).tolist()
        assert sum(bpe.characters[i] for i in ids) == len(sample_text)  # each character counted once, by its lead byte
    assert len(bpe.encode(text)) < 0.75 * len(text.encode())  # its 43 merges: far fewer tokens than bytes
    assert bpe.decode([0, *bpe.encode("ROMEO").tolist(), 0]) == "ROMEO"
    assert BPETokenizer.train(iter([text]), vocab_size=300).definition == bpe.definition  # the same text, the same BPE


def test_the_stream_holds_bytes_until_a_character_is_whole(bpe):
    snowman = [bpe.vocabulary.index(byte_level_alphabet()[b]) for b in "☃".encode()]  # its three bytes, one a token
    decode = bpe.stream_decoder()
    assert [decode(i) for i in snowman] == ["", "", "☃"] and decode.flush() == ""
    decode = bpe.stream_decoder()
    assert decode(snowman[0]) == "" and decode.flush() == "\ufffd"  # an unfinished character at the end
    written = ACCENTED * 3
    decode = bpe.stream_decoder()
    pieces = [decode(i) for i in bpe.encode(written).tolist()] + [decode.flush()]
    assert "".join(pieces) == written and not any("\ufffd" in piece for piece in pieces)
    assert any(piece == "" for piece in pieces[:-1])  # some token ended inside a character: it waited
    ids = random.Random(0).choices(range(1, len(bpe)), k=400)  # whatever a model writes
    decode = bpe.stream_decoder()
    assert "".join([decode(i) for i in ids] + [decode.flush()]) == bpe.decode(ids)


def test_a_bpe_is_rebuilt_from_its_definition_and_refused_without_it(text, bpe):
    again = tokenizer_for(bpe.vocabulary, bpe.definition)
    assert isinstance(again, BPETokenizer) and torch.equal(again.encode(text[:500]), bpe.encode(text[:500]))
    with pytest.raises(TokenizerError, match="tokenizer is missing"):
        tokenizer_for(bpe.vocabulary)
    with pytest.raises(TokenizerError, match="not a tokenizer definition"):
        tokenizer_for(bpe.vocabulary, bpe.definition[:200])
    altered = json.loads(bpe.definition)
    vocab, (one, two) = altered["model"]["vocab"], bpe.vocabulary[-2:]
    vocab[one], vocab[two] = vocab[two], vocab[one]  # two tokens' ids swapped
    with pytest.raises(TokenizerError, match="not its vocabulary"):
        tokenizer_for(bpe.vocabulary, json.dumps(altered))
    with pytest.raises(TokenizerError, match="not a byte-level BPE"):
        tokenizer_for(bpe.vocabulary, json.dumps({**json.loads(bpe.definition), "pre_tokenizer": None}))


def test_the_bpe_learns_from_the_training_text_alone(tmp_path):
    training = write_corpus(tmp_path / "train.txt", 18_000).read_text()
    held_out = ("zyzzyva " * 250)[:2000]  # pairs the training text never holds: zy, yz, zz, yv
    path = tmp_path / "text.txt"
    path.write_text(training + held_out)
    dm = data(path, vocab_size=300)
    assert dm.character_cuts == (18_000, 20_000)
    pairs = (b"zy", b"yz", b"zz", b"yv")
    assert not any(pair in dm.tokenizer.token_bytes(i) for i in range(1, 300) for pair in pairs)
    everything = BPETokenizer.train(iter([training + held_out]), 300)  # trained on all of it, it would learn them
    assert any(pair in everything.token_bytes(i) for i in range(1, 300) for pair in pairs)


def test_a_bpe_cache_is_reused_not_retrained_and_keyed_by_its_settings(tmp_path, monkeypatch):
    path = tmp_path / "play.txt"
    play(path)
    first = data(path)

    def retrained(*args, **kwargs):
        raise AssertionError("the BPE was trained again although its cache holds it")

    monkeypatch.setattr(BPETokenizer, "train", retrained)
    again = data(path)
    assert again.cache.path == first.cache.path and again.tokenizer.definition == first.tokenizer.definition
    assert torch.equal(again.cache.tokens, first.cache.tokens)
    monkeypatch.undo()
    others = [data(path, vocab_size=280), data(path, val_fraction=0.2), data(path, test_fraction=0.05)]
    assert len({first.cache.path, *(other.cache.path for other in others)}) == 4  # a BPE per size and split
    assert len(others[0].tokenizer) == 280


@pytest.mark.parametrize("how", ["altered merges", "garbled tokenizer", "vocabulary lacks a token"])
def test_a_bpe_record_that_does_not_verify_is_rebuilt(tmp_path, caplog, how):
    path = tmp_path / "play.txt"
    play(path)
    first = data(path)
    expected, definition = first.cache.ids().clone(), first.tokenizer.definition
    record_path = first.cache.path.with_suffix(".json")
    record = json.loads(record_path.read_text())
    if how == "altered merges":
        tokenizer = json.loads(record["tokenizer"])
        tokenizer["model"]["merges"] = tokenizer["model"]["merges"][::-1]
        record["tokenizer"] = json.dumps(tokenizer)
    elif how == "garbled tokenizer":  # with a checksum to match: the tokenizer itself must load
        record["tokenizer"] = "{not a tokenizer"
        record["tokenizer_checksum"] = token_cache.hashlib.sha256(record["tokenizer"].encode()).hexdigest()
    else:
        record["vocabulary"] = record["vocabulary"][:-1]
    record_path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="shakespeare"):
        rebuilt = data(path)
    assert "encoding the text again" in caplog.text
    assert torch.equal(rebuilt.cache.ids(), expected) and rebuilt.tokenizer.definition == definition


def test_the_pieces_encode_as_the_whole_text_would(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK", 64)  # many chunks and pieces: their edges fall everywhere
    monkeypatch.setattr(token_cache, "PIECE", 24)
    rng = random.Random(1)
    words = ["thou", "I'll", "we're", "don't", "naïve", "☃☃", "2024", "--", "  ", "\n\n", "\t", "Ωmega", "?!", "x1"]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "\n", ", "]) for _ in range(3000))
    path = tmp_path / "mixed.txt"
    path.write_text(text, encoding="utf-8")
    dm = data(path, vocab_size=290, val_fraction=0.1, test_fraction=0.05)
    val_cut, test_cut = dm.character_cuts
    parts = [dm.tokenizer.encode(part) for part in (text[:val_cut], text[val_cut:test_cut], text[test_cut:])]
    assert torch.equal(dm.cache.ids(), torch.cat(parts))  # each split encoded whole, on its own
    assert dm.cuts == (len(parts[0]), len(parts[0]) + len(parts[1]))
    ends = {end for _, (_, end) in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)}
    pieces = list(token_cache.word_pieces(text, 24, final=True)[0])
    assert "".join(pieces) == text and len(pieces) > 100
    assert {sum(map(len, pieces[: i + 1])) for i in range(len(pieces))} <= ends  # a piece ends where a word ends


def test_every_unit_holds_out_the_same_characters(tmp_path):
    path = tmp_path / "play.txt"
    text = play(path)
    assert len(text.encode()) > len(text)
    held = {}
    for unit in ("char", "byte", "bpe"):
        dm = data(path, unit, val_fraction=0.1, test_fraction=0.05)
        val_cut, test_cut = dm.cuts
        decode = dm.tokenizer.decode
        held[unit] = (
            decode(dm.cache.ids(0, val_cut)),
            decode(dm.cache.ids(val_cut, test_cut)),
            decode(dm.cache.ids(test_cut)),
        )
        assert dm.character_cuts == (
            len(text) - int(len(text) * 0.05) - int(len(text) * 0.1),
            len(text) - int(len(text) * 0.05),
        )
    train, val, test = text[: dm.character_cuts[0]], text[slice(*dm.character_cuts)], text[dm.character_cuts[1] :]
    assert held["char"] == held["byte"] == held["bpe"] == (train, val, test)


def test_an_ascii_text_is_cut_where_it_always_was(corpus):
    n = len(corpus.read_text())
    before = (n - int(n * 0.05) - int(n * 0.1), n - int(n * 0.05))  # the token positions of the code before
    assert data(corpus, "char", test_fraction=0.05).cuts == data(corpus, "byte", test_fraction=0.05).cuts == before


@pytest.mark.parametrize(
    "overrides, message",
    fast_first(
        [
            (
                ["data.unit=bpe", "data.vocab_size=256"],
                r"data.vocab_size=256 must be a whole number of at least 257 \(the 256 byte values and <\|pad\|>",
            ),
            (
                ["data.vocab_size=512"],
                r"data.vocab_size=512 sizes a BPE vocabulary, but data.unit=char.* data.unit=bpe",
            ),
            (["data.unit=byte", "data.vocab_size=512"], r"but data.unit=byte, whose vocabulary is the text's 256 byte"),
            (["data.unit=bpe"], r"data.unit=bpe needs data.vocab_size, .* at least 257 .* e.g. data.vocab_size=512"),
        ],
        keep=2,
    ),
)
def test_a_vocabulary_size_that_means_nothing_is_refused(tiny_cfg, overrides, message):
    with pytest.raises(UsageError, match=message):
        cfg = tiny_cfg(*overrides)
        check_config(cfg)
        ShakespeareDataModule(
            **{k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"}
        )


def test_a_vocabulary_the_text_cannot_fill_is_refused_naming_the_largest_it_can(tmp_path):
    path = tmp_path / "short.txt"
    write_corpus(path, 3000)
    with pytest.raises(UsageError, match=r"data.vocab_size=5000 is more than the training text supports") as err:
        data(path, vocab_size=5000)
    largest = int(err.value.args[0].split("Use data.vocab_size=")[1].split(" ")[0])
    assert 257 < largest < 5000 and len(data(path, vocab_size=largest).tokenizer) == largest
    with pytest.raises(UsageError, match=f"Use data.vocab_size={largest} or less"):
        data(path, vocab_size=largest + 1)


def bigram_checkpoint(path: Path, bpe: BPETokenizer, tmp_path: Path, **hparams) -> Path:
    """A checkpoint as train.py writes one (hyperparameters and weights) of a bigram over the BPE `bpe`."""
    model = OmegaConf.to_container(compose_train(tmp_path, ["model=bigram"]).model, resolve=True)
    module = ShakespeareModule(bpe.vocabulary, model, {"_target_": "torch.optim.Adam"}, tokenizer=bpe.definition)
    torch.save({"hyper_parameters": {**dict(module.hparams), **hparams}, "state_dict": module.state_dict()}, path)
    return path


def test_a_checkpoint_carries_its_bpe_and_writes_text_with_nothing_else(bpe, tmp_path):
    checkpoint = bigram_checkpoint(tmp_path / "bpe.ckpt", bpe, tmp_path)
    model, tokenizer = load_generator(checkpoint)
    assert tokenizer.definition == bpe.definition and model.cfg.vocab_size == 300
    out = io.StringIO()
    cfg = compose_generate(f"ckpt_path={checkpoint}", 'prompt="Ω ☃"', "max_new_tokens=60", "seed=3")
    [written] = write_samples(cfg, out)
    assert out.getvalue() == printable(f"Ω ☃{written}") + "\n" and "<|pad|>" not in written
    generator = torch.Generator().manual_seed(3)
    assert sample(model, tokenizer, "Ω ☃", max_new_tokens=60, generator=generator) == [written]


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"tokenizer": None}, r"its vocabulary holds tokens of several characters .* tokenizer is missing"),
        ({"tokenizer": "{damaged"}, r"its tokenizer is not a tokenizer definition .* altered or damaged"),
        ({"tokenizer": 42}, r"its vocabulary is damaged|not a tokenizer definition"),
    ],
)
def test_a_checkpoint_whose_tokenizer_is_missing_or_damaged_is_refused(bpe, tmp_path, hparams, message):
    checkpoint = bigram_checkpoint(tmp_path / "bpe.ckpt", bpe, tmp_path, **hparams)
    with pytest.raises(UsageError, match=rf"ckpt_path='{checkpoint}' cannot be read: {message}"):
        load_generator(checkpoint)


def test_a_checkpoint_written_before_bpe_still_loads(tmp_path):
    from tests.test_layout import ROOT

    fixture = ROOT / "tests" / "fixtures" / "qk_norm_muon_before_the_move.ckpt"
    assert "tokenizer" not in torch.load(fixture, weights_only=True)["hyper_parameters"]
    model, tokenizer = load_generator(fixture)
    assert tokenizer.unit == "char" and tokenizer.definition is None and len(tokenizer) == model.cfg.vocab_size


@torch.inference_mode()
def test_the_sliding_window_and_the_memory_estimate_take_a_larger_vocabulary(tmp_path, bpe):
    cfg = compose_train(tmp_path, ["model=qk_norm", "data.sequence_length=16"])
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=2048, **settings)).eval()
    idx = torch.randint(1, 2048, (2, 16))
    window = SlidingWindow(model, num_streams=2)
    for n in range(1, 17):
        torch.testing.assert_close(window(idx[:, :n]), model(idx[:, :n])[:, -1], atol=1e-5, rtol=1e-5)
    small = ShakespeareGenerator(GeneratorConfig(vocab_size=300, **settings)).eval()
    options = dict(max_new_tokens=16, num_samples=2, generator=None)
    slid = sample(small, bpe, "KING", context="slide", **{**options, "generator": torch.Generator().manual_seed(1)})
    assert slid == sample(
        small, bpe, "KING", context="crop", **{**options, "generator": torch.Generator().manual_seed(1)}
    )
    chars, tokens = (step_memory(GeneratorConfig(vocab_size=v, **settings), 16) for v in (66, 2048))
    assert tokens.logits == 3 * 16 * 16 * 2048 * 4 and tokens.parameters > chars.parameters
    assert tokens.total > chars.total


def test_labels_show_a_tokens_text_made_readable(bpe):
    assert bytes_label(" é\n".encode()) == "␣é⏎" and bytes_label(b"\xe2\x98") == "<0xE2><0x98>"
    labels = token_labels(bpe)
    assert labels[0] == PAD and len(set(labels)) == len(labels)  # every token told apart
    assert any(label.startswith("␣") and len(label) > 2 for label in labels)  # a word with its space
    grid = attention_grid([("block 0", torch.rand(2, 8, 8))], ["␣thousand", "⏎⏎", "<0xE2>", "a"] * 2)
    assert grid.ndim == 3 and grid.shape[1] <= 2 * (LEFT_LABELS + 8 * 20 + 10)  # long labels shortened, not spilled


def timed_run(tokens: str, losses: list[float], bpcs: list[float]) -> Run:
    cfg = compose_train(Path("/nonexistent"), ["experiment=tokenizer_ladder", f"tokens={tokens}"])
    config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)
    steps = [500 * (i + 1) for i in range(len(losses))]
    scalars = {
        "val/loss": [(s, 1.0, v) for s, v in zip(steps, losses)],
        "val/bpc": [(s, 1.0, v) for s, v in zip(steps, bpcs)],
    }
    return Run(path=Path(tokens), name=tokens, config=config, scalars=scalars)


@pytest.mark.slow  # trains runs (or reads a trained one) end to end
def test_the_report_says_which_tokens_win_at_equal_time_in_bits_per_character():
    runs = [
        timed_run("bpe_512", [3.9, 3.5], [2.10, 1.90]),
        timed_run("char", [1.4, 1.2], [2.02, 1.73]),
        timed_run("byte", [1.5, 1.3], [2.16, 1.88]),
    ]
    table = units_table(runs)
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:5]]
    assert rows == ["char", "byte", "bpe 512"]  # characters, bytes, then BPEs by size
    best, second = sorted(runs, key=lambda run: run.curve("val/bpc")[-1])[:2]
    gap = second.curve("val/bpc")[-1] - best.curve("val/bpc")[-1]
    assert f"At equal time (120 s each), **{best.tokens}** wins: {best.curve('val/bpc')[-1]:.4f} bits" in table
    assert f"{gap:.4f} below {second.tokens}" in table
    cells = markdown_table(runs).splitlines()[2].split(" | ")
    assert cells[4] == "3.5000" and cells[6] == "1.9000"  # a BPE's loss per token, and its bits per character
    assert units_table(runs[1:2]) == ""  # one kind of tokens: nothing to compare


@pytest.mark.slow
def test_a_char_run_reaches_the_very_losses_of_its_old_cuts(tiny_cfg, corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tiny_cfg("model=head", "trainer.max_epochs=2", "callbacks.generation_sample.max_new_tokens=0"))
    run = tmp_path / "run"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    val, bpc = (events.Scalars(tag)[-1].value for tag in ("val/loss", "val/bpc"))
    assert bpc == pytest.approx(val / math.log(2), rel=1e-6)  # one token a character: bits per character as before
    model, tokenizer = load_generator(run / "checkpoints" / "last.ckpt")
    ids = tokenizer.encode(corpus.read_text())
    n = len(ids)
    cut = n - int(n * 0.1)  # where the code before this one cut the validation text: the last tenth of its tokens
    starts = torch.arange(cut, cut + 2 * 32)  # two batches of 32 windows (trainer.limit_val_batches=2)
    windows = torch.stack([ids[s : s + 9] for s in starts.tolist()])
    with torch.no_grad():
        expected = model.loss(windows[:, :-1], windows[:, 1:])
    assert val == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_a_bpe_run_trains_reports_bits_per_character_and_its_checkpoint_alone_writes(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "play.txt"
    text = play(path)
    cfg = tiny_cfg(
        f"data.path={path}",
        "data.unit=bpe",
        "data.vocab_size=300",
        "model=head",
        "data.test_fraction=0.05",
        "data.val_stride=8",
        "trainer.limit_val_batches=null",
        "callbacks.generation_sample.max_new_tokens=30",
    )
    metrics = fit(cfg)
    run = tmp_path / "run"
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    dm = data(path, test_fraction=0.05, sequence_length=8, val_stride=8, batch_size=32)
    assert checkpoint["hyper_parameters"]["tokenizer"] == dm.tokenizer.definition  # plain data: a JSON string
    assert checkpoint["datamodule_hyper_parameters"]["vocab_size"] == 300

    def bits_per_character(model, batches) -> float:
        nats = characters = 0.0
        counts = torch.tensor(dm.tokenizer.characters, dtype=torch.float64)
        with torch.no_grad():
            for x, y in batches:
                nats += float(model.losses(x, y).double().sum())
                characters += float(counts[y].sum())
        return nats / characters / math.log(2)

    model, tokenizer = load_generator(run / "checkpoints" / "best.ckpt")
    assert metrics["test/bpc"] == pytest.approx(bits_per_character(model, dm.test_dataloader()), rel=1e-4)
    assert metrics["test/bpc"] < metrics["test/loss"] / math.log(2)  # a token holds more than one character
    last, _ = load_generator(run / "checkpoints" / "last.ckpt")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars("val/bpc")[-1].value == pytest.approx(bits_per_character(last, dm.val_dataloader()), rel=1e-4)
    log = (run / "research_log.md").read_text()
    assert f"({events.Scalars('val/bpc')[-1].value:.4f} bits per character)" in log

    evaluation = evaluate_checkpoint(compose_evaluate(f"ckpt_path={run}", "threads=1", "record=false"), io.StringIO())
    val_cut, test_cut = dm.character_cuts
    assert evaluation.characters == test_cut - val_cut  # per character of the held-out text, as the compressors
    out = io.StringIO()
    write_samples(compose_generate(f"ckpt_path={run}", "prompt=ROMEO", "max_new_tokens=40"), out)
    assert out.getvalue().startswith("ROMEO") and "<|pad|>" not in out.getvalue()

    labels = (next(run.rglob("metadata.tsv"))).read_text(encoding="utf-8").splitlines()
    assert labels == token_labels(tokenizer) and any(len(label) > 1 and label != PAD for label in labels)
    assert events.Tags()["images"] == ["inspection/attention"]
    assert lead_bytes(text.encode()) == len(text)
