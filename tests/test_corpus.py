"""Fetching corpora (a real local HTTP server, zips the tests make) and the token cache: encoded once,
vectorised, verified on every open, rebuilt when stale or damaged, encoded once under concurrency."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import math
import random
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from shakespeare.data import token_cache
from shakespeare.data.corpus import fetch_corpus, unpack
from shakespeare.data.token_cache import load_tokens
from shakespeare.errors import UsageError
from shakespeare.tokenizer import CharTokenizer
from tests.harness import compose_generate, compose_train

TEXT8_LIKE = " ".join(
    "anarchism originated as a term of abuse first used against early working class".split() * 40
).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zipped(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return buffer.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1 serving `files` (name -> bytes); `short` names are cut short."""

    def __init__(self, files: dict[str, bytes], short: set[str] = frozenset()):
        files, short = dict(files), set(short)
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805
                name = handler.path.lstrip("/")
                self.requests.append(name)
                if name not in files:
                    handler.send_error(404)
                    return
                body = files[name]
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body[: len(body) // 2] if name in short else body)

            def log_message(handler, *args):  # noqa: N805
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(files: dict[str, bytes], short: set[str] = frozenset()) -> Server:
        servers.append(Server(files, short))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_zipped_corpus_is_downloaded_verified_unpacked_and_cached(tmp_path, serve):
    archive = zipped("text8", TEXT8_LIKE)
    server = serve({"text8.zip": archive})
    args = (f"{server.url}/text8.zip", sha256(TEXT8_LIKE), tmp_path / "cache", "text8", sha256(archive))
    text = fetch_corpus(*args)
    assert text == tmp_path / "cache" / "text8" and text.read_bytes() == TEXT8_LIKE
    server.close()  # offline from here: the cache serves it
    assert fetch_corpus(*args) == text
    text.unlink()  # the verified zip is kept: the text is unpacked again without the network
    assert fetch_corpus(*args).read_bytes() == TEXT8_LIKE
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [
        "text8",
        "text8.zip",
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong hash", r"has SHA-256 \w+, not the expected 0{64}.*data.archive_sha256"),
        ("truncated", r"was cut short: [\d,]+ of [\d,]+ bytes arrived"),
        ("no member", r"holds no 'text8' \(it holds wiki.txt\)"),
        ("wrong text", r"'text8' unpacked from .* has SHA-256 \w+, not the expected 1{64}"),
    ],
)
def test_a_bad_download_is_refused_and_nothing_is_kept(tmp_path, serve, case, message):
    archive = zipped("wiki.txt" if case == "no member" else "text8", TEXT8_LIKE)
    server = serve({"text8.zip": archive}, short={"text8.zip"} if case == "truncated" else set())
    archive_hash = "0" * 64 if case == "wrong hash" else sha256(archive)
    text_hash = "1" * 64 if case == "wrong text" else sha256(TEXT8_LIKE)
    with pytest.raises(UsageError, match=message):
        fetch_corpus(f"{server.url}/text8.zip", text_hash, tmp_path / "cache", "text8", archive_hash)
    kept = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")}
    assert kept <= {"text8.zip"} and not any(name.endswith(".part") for name in kept) and "text8" not in kept


def test_a_damaged_archive_is_deleted_with_a_clear_error(tmp_path):
    text = random.Random(0).randbytes(50_000)
    for damaged in (zipped("text8", text)[:30_000], zipped("text8", text)[:-30]):  # cut in the data / in the index
        archive = tmp_path / "text8.zip"
        archive.write_bytes(damaged)
        with pytest.raises(UsageError, match="is damaged .* run the command again"):
            unpack(archive, "text8", tmp_path / "text8", sha256(text))
        assert not archive.exists() and not (tmp_path / "text8").exists()
    archive.write_bytes(zipped("text8", text).replace(text[1000:1010], bytes(10)))  # stored bytes changed: bad CRC
    with pytest.raises(UsageError, match="is damaged"):
        unpack(archive, "text8", tmp_path / "text8", sha256(text))


def test_offline_a_copy_in_the_cache_is_used_and_a_wrong_one_named(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "text8").write_bytes(TEXT8_LIKE)
    unreachable = "http://127.0.0.1:9/text8.zip"
    assert fetch_corpus(unreachable, sha256(TEXT8_LIKE), cache, "text8", "0" * 64) == cache / "text8"
    (cache / "text8").write_bytes(b"something else")
    with pytest.raises(
        UsageError, match=r"Could not download .*put a verified copy at .*text8.*The copy of text8 there has SHA-256"
    ):
        fetch_corpus(unreachable, sha256(TEXT8_LIKE), cache, "text8", "0" * 64)
    assert (cache / "text8").read_bytes() == b"something else"  # the user's file is never deleted
    (cache / "text8.zip").write_bytes(b"another version")
    with pytest.raises(
        UsageError,
        match=rf"The file already at {cache / 'text8.zip'} does not match: its SHA-256 is "
        rf"{sha256(b'another version')}, the published one 0{{64}} \(data.archive_sha256\)",
    ):
        fetch_corpus(unreachable, sha256(TEXT8_LIKE), cache, "text8", "0" * 64)
    assert not list(cache.glob("*.lock"))  # a failed fetch leaves no lock file behind


def test_tinyshakespeare_download_is_verified_and_cached(tmp_path, corpus):
    url, digest = corpus.as_uri(), sha256(corpus.read_bytes())
    cached = fetch_corpus(url, digest, tmp_path / "cache", "tinyshakespeare.txt")
    assert cached == tmp_path / "cache" / "tinyshakespeare.txt" and cached.read_bytes() == corpus.read_bytes()
    corpus.unlink()  # a second call is served from the cache
    assert fetch_corpus(url, digest, tmp_path / "cache", "tinyshakespeare.txt") == cached
    with pytest.raises(UsageError, match=r"SHA-256 .*not the expected 0{64}: it was not kept"):
        fetch_corpus(write(tmp_path / "x.txt", "text").as_uri(), "0" * 64, tmp_path / "other", "t.txt")
    assert list((tmp_path / "other").iterdir()) == []  # nothing kept, not even the download's lock


def data_config(name: str) -> DictConfig:
    """conf/data/<name>.yaml as Hydra composes it (enwik8 extends text8)."""
    return compose_train(Path("/nonexistent"), [f"data={name}"]).data


def test_a_cached_corpus_needs_neither_its_text_nor_the_network(tmp_path, corpus):
    from shakespeare.data.datamodule import ShakespeareDataModule

    settings = dict(url=corpus.as_uri(), sha256=sha256(corpus.read_bytes()), file="tiny.txt", cache_dir=str(tmp_path))
    first = ShakespeareDataModule(**settings)
    first.setup()
    (tmp_path / "tiny.txt").unlink()
    corpus.unlink()  # offline, and the downloaded text gone: its tokens are keyed by its published SHA-256
    again = ShakespeareDataModule(**settings)
    again.setup()
    assert (
        torch.equal(again.cache.tokens, first.cache.tokens) and again.tokenizer.vocabulary == first.tokenizer.vocabulary
    )


def test_shakespeare_corpus_names_a_local_copy(corpus, monkeypatch):
    monkeypatch.setenv("SHAKESPEARE_CORPUS", str(corpus))
    assert data_config("shakespeare").path == str(corpus)
    monkeypatch.delenv("SHAKESPEARE_CORPUS")
    assert data_config("shakespeare").path is None


@pytest.mark.parametrize("name, unit", [("enwik8", "byte"), ("text8", "char")])
def test_data_configs_of_the_standard_corpora(name, unit):
    data = data_config(name)
    data.sequence_length = 32
    assert (data.unit, data.file, data.val_fraction, data.test_fraction) == (unit, name, 0.05, 0.05)
    assert data.url.endswith(f"/{name}.zip") and data.val_stride == 32  # each held-out character once
    assert int(10**8 * data.val_fraction) == int(10**8 * data.test_fraction) == 5 * 10**6  # 90M / 5M / 5M


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_vectorised_encoding_matches_the_simple_one_across_chunk_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK", 7)  # multi-byte characters cut by chunk edges, ASCII and not chunks
    rng = random.Random(0)
    text = "".join(rng.choice("ab cdé☃\nΩ𝄞") if i % 50 < 25 else rng.choice("xyz ") for i in range(3000))
    cache = load_tokens([write(tmp_path / "t.txt", text)], "char", tmp_path / "cache")
    reference = CharTokenizer.from_text(text)
    assert cache.vocabulary == reference.vocabulary and torch.equal(cache.ids(), reference.encode(text))
    assert cache.tokens.dtype == torch.uint8 and cache.lengths == [len(text)]


def test_ids_take_two_bytes_past_256_characters(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    cache = load_tokens([write(tmp_path / "cjk.txt", text)], "char", tmp_path / "cache")
    assert cache.tokens.dtype == torch.int16 and cache.path.stat().st_size == 2 * len(text)
    assert torch.equal(cache.ids(), CharTokenizer.from_text(text).encode(text))


def test_a_non_utf8_byte_is_named_by_its_offset_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK", 4)
    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld".encode() + b"\xe2\x98" + b" end")  # a snowman's first two bytes, then a space
    with pytest.raises(UsageError, match=r"not UTF-8 text \(byte 13 cannot be decoded\).*data.unit=byte"):
        load_tokens([path], "char", tmp_path / "cache")
    path.write_bytes("héllo".encode() + b"\xe2\x98")  # cut short at the very end
    with pytest.raises(UsageError, match=r"byte 6 cannot be decoded"):
        load_tokens([path], "char", tmp_path / "cache")


def test_the_cache_is_encoded_once_then_mapped(tmp_path, corpus, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="shakespeare"):
        first = load_tokens([corpus], "char", tmp_path / "cache")
    assert "Encoding" in caplog.text
    monkeypatch.setattr(token_cache, "encode", lambda *args: pytest.fail("encoded again"))
    again = load_tokens([corpus], "char", tmp_path / "cache")
    assert again.path == first.path and torch.equal(again.tokens, first.tokens)
    if Path("/proc/self/maps").is_file():  # mapped, not read into memory
        assert str(again.path) in Path("/proc/self/maps").read_text()
    write(corpus, corpus.read_text() + "more")  # an edited text is another text: a new cache, the old one untouched
    monkeypatch.undo()
    edited = load_tokens([corpus], "char", tmp_path / "cache")
    assert edited.path != first.path and first.path.is_file() and len(edited.tokens) == len(first.tokens) + 4


def damage(path: Path, how: str) -> None:
    record = path.with_suffix(".json")
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif how == "flipped byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "garbled record":
        record.write_text("{not json")
    elif how == "old format":
        record.write_text(json.dumps({**json.loads(record.read_text()), "format": 0}))
    elif how == "record lacks fields":
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "lengths"}))
    elif how == "no record":
        record.unlink()


@pytest.mark.parametrize(
    "how", ["truncated", "flipped byte", "garbled record", "old format", "record lacks fields", "no record"]
)
def test_a_stale_or_damaged_cache_is_rebuilt_never_trusted(tmp_path, corpus, caplog, how):
    first = load_tokens([corpus], "char", tmp_path / "cache")
    expected = first.ids().clone()
    del first
    damage(next((tmp_path / "cache" / "tokens").glob("*.bin")), how)
    with caplog.at_level(logging.WARNING, logger="shakespeare"):
        rebuilt = load_tokens([corpus], "char", tmp_path / "cache")
    assert torch.equal(rebuilt.ids(), expected)
    if how != "no record":
        assert "encoding the text again" in caplog.text


def test_the_checksum_covers_every_block(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "BLOCK", 64)  # 1000 bytes: 16 blocks, hashed in parallel
    data = bytearray(random.Random(0).randbytes(1000))
    path = tmp_path / "tokens.bin"
    path.write_bytes(data)
    blocks = b"".join(hashlib.sha256(data[i : i + 64]).digest() for i in range(0, 1000, 64))
    assert token_cache.checksum(path) == hashlib.sha256(blocks).hexdigest()
    for i in (0, 500, 999):
        flipped = data.copy()
        flipped[i] ^= 1
        path.write_bytes(flipped)
        assert token_cache.checksum(path) != hashlib.sha256(blocks).hexdigest()


def test_concurrent_runs_encode_once(tmp_path, corpus, monkeypatch):
    calls, real = [], token_cache.encode
    barrier = threading.Barrier(3)

    def slow_encode(*args):
        calls.append(args)
        threading.Event().wait(0.3)  # long enough for the other runs to find the lock taken
        return real(*args)

    monkeypatch.setattr(token_cache, "encode", slow_encode)
    results = []

    def run():
        barrier.wait()
        results.append(load_tokens([corpus], "char", tmp_path / "cache"))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 3 and all(torch.equal(r.tokens, results[0].tokens) for r in results)


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path, corpus, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache.os, "replace", no_space)
    with pytest.raises(
        UsageError, match="Could not write the token cache .*No space left on device.*SHAKESPEARE_CACHE"
    ):
        load_tokens([corpus], "char", tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def text8_like(path: Path, n_chars: int = 60_000) -> Path:
    """A small text8: lowercase words and single spaces, 27 characters at most."""
    rng, words = random.Random(0), TEXT8_LIKE.decode().split()
    text = " ".join(rng.choice(words) for _ in range(n_chars // 5))[:n_chars]
    path.write_text(text)
    return path


TINY_RUN = [
    "model=bigram",
    "data.batch_size=64",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=5",
    "trainer.enable_progress_bar=false",
    "callbacks.generation_sample.max_new_tokens=0",
]


@pytest.mark.slow
def test_text8_trains_then_tests_best_ckpt_and_every_record_shows_bits_per_character(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shakespeare.cli.train import fit
    from shakespeare.data.datamodule import ShakespeareDataModule
    from shakespeare.model.loading import load_generator
    from shakespeare.report.__main__ import main as report

    cfg = compose_train(tmp_path / "run", ["data=text8", f"data.path={text8_like(tmp_path / 'text8')}", *TINY_RUN])
    metrics = fit(cfg)
    assert metrics["test/bpc"] == pytest.approx(metrics["test/loss"] / math.log(2)) and "val/loss_best" in metrics
    # the reported test loss is best.ckpt's over every test window (the text's last 5%, each character once)
    run = tmp_path / "run"
    model, _ = load_generator(run / "checkpoints" / "best.ckpt")
    data = ShakespeareDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    data.setup()
    with torch.no_grad():
        losses = [(model.loss(x, y) * len(x), len(x)) for x, y in data.test_dataloader()]
    assert metrics["test/loss"] == pytest.approx(
        float(sum(loss for loss, _ in losses) / sum(n for _, n in losses)), rel=1e-4
    )
    assert sum(n for _, n in losses) == len(range(60_000 - 3000, 60_000 - 8, 8))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    val = [e.value for e in events.Scalars("val/loss")]
    assert [e.value for e in events.Scalars("val/bpc")] == pytest.approx([v / math.log(2) for v in val], rel=1e-5)
    assert events.Scalars("test/loss")[-1].value == pytest.approx(metrics["test/loss"])
    log = (run / "research_log.md").read_text()
    assert f"Best eval loss: {min(val):.4f} ({min(val) / math.log(2):.4f} bits per character)" in log
    assert f"Test loss: {metrics['test/loss']:.4f} ({metrics['test/bpc']:.4f} bits per character" in log
    capsys.readouterr()
    assert report([str(run)]) == 0
    table = capsys.readouterr().out
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    row = [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]
    cells = dict(zip(header, row))
    assert cells["test loss"] == f"{metrics['test/loss']:.4f}" and cells["test bpc"] == f"{metrics['test/bpc']:.4f}"
    assert cells["eval bpc"] == f"{min(val) / math.log(2):.4f}"
    assert cells["log's eval loss"] == "-"  # the research log's figures are tinyshakespeare's


@pytest.mark.slow
def test_a_byte_level_model_trains_on_any_file_and_generates_text(tmp_path):
    from shakespeare.cli.generate import write_samples
    from shakespeare.cli.train import fit
    from shakespeare.tokenizer import BYTE_VOCABULARY, printable

    path = tmp_path / "enwik8"
    path.write_bytes(("<page>Ω wiki ☃ text</page>\n".encode() + b"\xff\x00") * 2000)  # not UTF-8: bytes are fine
    fit(compose_train(tmp_path / "run", ["data=enwik8", f"data.path={path}", *TINY_RUN]))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["vocabulary"] == BYTE_VOCABULARY
    out = io.StringIO()
    [text] = write_samples(compose_generate(f"ckpt_path={tmp_path / 'run'}", 'prompt="Ω ☃"', "max_new_tokens=300"), out)
    assert out.getvalue() == printable(f"Ω ☃{text}") + "\n"  # control bytes shown as escapes on the terminal
    assert 0 < len(text) <= 300 and "<|pad|>" not in text  # 300 bytes, as text
