"""Yardsticks on tinyshakespeare: what each standard compressor needs for the held-out text after the training text.

    python benchmarks/yardsticks.py [--split val] [--val-fraction 0.1] [--test-fraction 0.05] [--unit char]
    python benchmarks/yardsticks.py --path other.txt

The text is --path, else $SHAKESPEARE_CORPUS, else ../shared/data/tinyshakespeare.txt beside the checkout; its
token cache goes to a temporary folder, removed at the end. For each compressor of shakespeare/data/yardsticks.py:
bits/char and nats/char of the held-out split (bits = 8 x what its output grows by when the held-out text follows
the training text), and the seconds it took, wall clock and CPU (other processes sharing the cores slow the first,
not the second), with the load average. Then the same figures through `yardsticks()`, read from their record.
Targets, tinyshakespeare's default split (the last 10% held out, contiguous), within 0.01 bits/char:
gzip 3.10, zstd 2.54, xz 2.52, bzip2 2.40, PPMd 2.029.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shakespeare.data import yardsticks as module  # noqa: E402
from shakespeare.data.corpus import CORPUS_ENV  # noqa: E402
from shakespeare.data.datamodule import ShakespeareDataModule  # noqa: E402

TARGETS = {"gzip -9": 3.10, "zstd -22": 2.54, "xz -9e": 2.52, "bzip2 -9": 2.40, "PPMd -o6 -m256": 2.029}
TOLERANCE = 0.01  # bits/char
DEFAULT = ("val", 0.1, None, "char")  # the split the targets are for: --split, --val-fraction, --test-fraction, --unit


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average ?"


def corpus(path: str | None) -> Path:
    found = path or os.environ.get(CORPUS_ENV) or ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not Path(found).is_file():
        sys.exit(f"No text at {found}: pass --path, or set {CORPUS_ENV}=/path/to/tinyshakespeare.txt.")
    return Path(found)


def timed(compressor: module.Compressor, train: bytes, held_out: bytes, characters: int):
    """The compressor's yardstick, and the wall-clock and CPU seconds it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    bits = module.conditional_bits(compressor.compress, train, held_out)
    return module.Yardstick(compressor.name, bits, characters), time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="the text (default: tinyshakespeare)")
    parser.add_argument("--split", default="val", choices=module.HELD_OUT)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=None)
    parser.add_argument("--unit", default="char", choices=("char", "byte"))
    args = parser.parse_args()
    text = corpus(args.path)
    default = args.path is None and (args.split, args.val_fraction, args.test_fraction, args.unit) == DEFAULT
    with tempfile.TemporaryDirectory(prefix="yardsticks-") as cache:
        fractions = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction}
        data = ShakespeareDataModule(path=str(text), cache_dir=cache, unit=args.unit, **fractions)
        train_end, start, stop = module.held_out_range(data.text, args.split)
        train, held_out = (
            module.text_bytes(data.cache, data.tokenizer, a, b) for a, b in ((0, train_end), (start, stop))
        )
        unit = "char" if args.unit == "char" else "byte"
        print(
            f"{text.name}: {args.split} split, tokens [{start:,}, {stop:,}) ({stop - start:,} {unit}s, "
            f"{len(held_out):,} bytes) after the training text [0, {train_end:,}) ({len(train):,} bytes); "
            f"{os.cpu_count()} cores, {load()}"
        )
        print(f"  {'compressor':<16} {'bits/' + unit:>10} {'nats/' + unit:>10} {'wall s':>8} {'CPU s':>8}")
        found = []
        for compressor in module.COMPRESSORS:
            yardstick, wall, cpu = timed(compressor, train, held_out, stop - start)
            found.append(yardstick)
            target = TARGETS.get(yardstick.compressor) if default else None
            verdict = (
                f"  (target {target:.3f}: {'met' if abs(yardstick.bits_per_char - target) <= TOLERANCE else 'MISSED'})"
                if target
                else ""
            )
            print(
                f"  {yardstick.compressor:<16} {yardstick.bits_per_char:10.4f} {yardstick.nats_per_char:10.4f} "
                f"{wall:8.2f} {cpu:8.2f}{verdict}  [{compressor.version}]"
            )
        record = module.record_path(data.cache, args.split, (train_end, start, stop))
        module.write_record(record, data.cache.path.stem, (train_end, start, stop), found)
        wall = time.perf_counter()
        again = module.yardsticks(ShakespeareDataModule(**data.hparams).text, args.split)
        print(
            f"yardsticks() from the record {record.name}: {time.perf_counter() - wall:.2f} s (a fresh data module's "
            f"setup included), {'the same figures' if again == found else 'OTHER FIGURES'}; {load()}"
        )


if __name__ == "__main__":
    main()
