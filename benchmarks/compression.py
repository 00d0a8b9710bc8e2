"""Compression speed and size: characters a second each way at the cpu_speedrun_short shape (4 x 128, context
128) on one thread, what the coding adds to the model's own step, and an exact round trip of about 1 MB of text.

    python benchmarks/compression.py [--ckpt RUN_OR_CKPT] [--chars 2000] [--repeats 3] [--bytes 1000000]
    python benchmarks/compression.py --bytes 0        # the speed alone

Without --ckpt the model is an untrained one of the experiment's shape (its config composed from conf/, as
benchmarks/generation.py does) with tinyshakespeare's 65 characters: speed does not depend on the weights, but
its size is about log2(65) = 6 bits a character, so only the overhead against its own code length means
something. The text is assembled at run time from texts already on this machine (the licenses in
/usr/share/common-licenses, the packages' copyright files, Python's own .txt and .rst files), each file once,
filtered to the model's vocabulary for a character model; nothing of it is kept. Each speed is the best of
`--repeats` interleaved runs, so a busy machine disturbs it least; per CPU-second figures (this process's
time) are printed too. Target: >= 1,500 characters a second each way on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shakespeare.evaluation import coding  # noqa: E402
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator  # noqa: E402
from shakespeare.model.loading import load_generator, resolve_checkpoint  # noqa: E402
from shakespeare.run.composition import CONFIG_DIR  # noqa: E402  (registers the model group's base)
from shakespeare.tokenizer import PAD, Tokenizer  # noqa: E402

TINYSHAKESPEARE = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65 characters
TARGET = 1_500


def untrained_checkpoint(experiment: str, folder: Path) -> Path:
    """A checkpoint, as train.py writes one, of an untrained model of `experiment`'s shape."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    vocabulary = [PAD, *TINYSHAKESPEARE]
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(vocabulary), **settings))
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    path = folder / f"untrained_{experiment}.ckpt"
    torch.save({"hyper_parameters": {"vocabulary": vocabulary, "model": settings}, "state_dict": state}, path)
    return path


def sources() -> list[Path]:
    """Texts every Debian-like system and every Python installation carries, in a fixed order."""
    found = sorted(Path("/usr/share/common-licenses").glob("*"))
    found += sorted(Path("/usr/share/doc").glob("*/copyright"))
    for prefix in dict.fromkeys([sys.base_prefix, sys.prefix]):
        found += sorted(p for pattern in ("*.txt", "*.rst") for p in Path(prefix).rglob(pattern))
    return [path for path in found if path.is_file()]


def assembled_text(tokenizer: Tokenizer, size: int) -> tuple[bytes, int]:
    """About `size` bytes from `sources()`, each distinct file once: a character model's text keeps only the
    characters of its vocabulary (tabs become spaces); a byte model's is the files' bytes. And the file count."""
    keep = set(tokenizer.vocabulary[1:]) if tokenizer.unit == "char" else None
    parts, seen, total = [], set(), 0
    for path in sources():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if keep is not None:
            text = data.decode("utf-8", errors="ignore").replace("\t", " ")
            data = "".join(ch for ch in text if ch in keep).encode("utf-8")
        parts.append(data)
        total += len(data)
        if total >= size:
            break
    data = b"".join(parts)[:size]
    if keep is not None:  # not splitting a character at the end
        data = data.decode("utf-8", errors="ignore").encode("utf-8")
    return data, len(parts)


def seconds(work) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def model_alone(model: ShakespeareGenerator, ids: np.ndarray, rule: str) -> None:
    """The model's steps over `ids` without the coding: what compression adds is measured against it."""
    read = coding.TokenReader(model, rule)
    for token in [coding.PAD_ID, *ids[:-1].tolist()]:
        read(token)


def speeds(model, ids: np.ndarray, rule: str, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Wall-clock and CPU seconds of each repeat: compressing `ids`, decompressing them, the model's steps alone."""
    words, _ = coding.encode_tokens(model, ids, rule)
    work = {
        "compress": lambda: coding.encode_tokens(model, ids, rule),
        "decompress": lambda: list(coding.decode_tokens(model, words, len(ids), rule)),
        "model": lambda: model_alone(model, ids, rule),
    }
    runs = {name: [] for name in work}
    for _ in range(repeats):  # interleaved: each repeat sees the machine as the others do
        for name, step in work.items():
            runs[name].append(seconds(step))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a run folder or checkpoint; default: an untrained model of --experiment")
    parser.add_argument("--experiment", default="cpu_speedrun_short", help="the untrained model's shape")
    parser.add_argument("--chars", type=int, default=2_000, help="tokens timed in each speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=1_000_000, help="the round trip's text; 0: no round trip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", default="auto", choices=["auto", "crop", "slide"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = resolve_checkpoint(args.ckpt) if args.ckpt else untrained_checkpoint(args.experiment, folder)
        model, tokenizer = load_generator(checkpoint)
        cfg = model.cfg
        text, files = assembled_text(tokenizer, max(args.bytes, 4 * args.chars))
        rule = coding.TokenReader(model, args.context).rule
        print(
            f"model: {'checkpoint ' + str(checkpoint) if args.ckpt else f'UNTRAINED, {args.experiment} shape'} "
            f"({cfg.name}: {cfg.num_blocks} block(s) x {cfg.embedding_size}, {cfg.num_heads} heads, context "
            f"{cfg.sequence_length}, norm {cfg.norm}), vocabulary {cfg.vocab_size} ({tokenizer.unit}s), "
            f"context={rule}; torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(f"text: {len(text):,} bytes from {files} files already on this machine (not kept)")
        ids = coding.text_ids(tokenizer, text, "text")[: args.chars]
        runs = speeds(model, ids, rule, args.repeats)
        for clock, i in (("wall clock", 0), ("CPU time", 1)):
            best = {name: min(t[i] for t in times) for name, times in runs.items()}
            print(f"[{clock}, best of {args.repeats}, {len(ids):,} {tokenizer.unit}s]")
            for way in ("compress", "decompress"):
                rate = len(ids) / best[way]
                print(
                    f"  {way:<10}  {rate:8,.0f} {tokenizer.unit}s/s  (target >= {TARGET:,}: "
                    f"{'met' if rate >= TARGET else 'MISSED'}; the coding adds "
                    f"{100 * (best[way] / best['model'] - 1):+.1f}% to the model's steps alone, "
                    f"{1e6 * (best[way] - best['model']) / len(ids):.0f} us a token)"
                )
            print(f"  model alone {len(ids) / best['model']:8,.0f} {tokenizer.unit}s/s")
        print(f"load average after the speed runs: {os.getloadavg()[0]:.1f}")
        if args.bytes:
            round_trip(model, tokenizer, checkpoint, text, folder, args.context)


def round_trip(model, tokenizer, checkpoint: Path, text: bytes, folder: Path, context: str) -> None:
    """Compress `text` and decompress it again with the compress command's own functions; exact or it raises."""
    source, packed, copy = folder / "text", folder / "text.shkz", folder / "copy"
    source.write_bytes(text)
    print(f"\nround trip of {len(text):,} bytes:")
    compressed = coding.compress_file(model, tokenizer, checkpoint, source, packed, context)
    print(compressed.summary())
    decompressed = coding.decompress_file(model, tokenizer, checkpoint, packed, copy, context)
    print(decompressed.summary())
    exact = copy.read_bytes() == text
    print(f"exact: {exact}; load average {os.getloadavg()[0]:.1f}")
    if not exact:
        raise SystemExit("the round trip did not give back the text")


if __name__ == "__main__":
    main()
