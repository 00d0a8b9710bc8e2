"""The byte-level BPE's costs: training it on a text's training split, encoding the text into the token cache, and a
BPE run's set-up from the cache.

    python benchmarks/tokenizer.py                          # tinyshakespeare, BPEs of 512 and 2048 tokens
    python benchmarks/tokenizer.py --megabytes 5            # tinyshakespeare repeated to 5 MB (text8 is 100 MB)
    python benchmarks/tokenizer.py --vocab-sizes 264,1024 --path some.txt

Each size is measured in a fresh cache folder (removed at the end) and a fresh process: `train` is the BpeTrainer
on the training split (the text before data.val_fraction), `encode` the whole text into the token cache in pieces
(the splits each encoded on their own), `set-up` a second ShakespeareDataModule.setup() that finds the cache (the
process's imports left out; `with imports`: the whole command from a bare interpreter). Targets on tinyshakespeare:
train <= 5 s, set-up <= 1 s; text8's 90M training characters: train <= 2 minutes. Prints the load average too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURE = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.tokenizer import BPETokenizer
path, cache, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
trained = {}
real = BPETokenizer.train.__func__
def timed(cls, *args, **kwargs):
    began = time.perf_counter()
    tokenizer = real(cls, *args, **kwargs)
    trained["seconds"] = time.perf_counter() - began
    return tokenizer
BPETokenizer.train = classmethod(timed)
began = time.perf_counter()
first = ShakespeareDataModule(path=path, cache_dir=cache, unit="bpe", vocab_size=size)
first.setup()
build = time.perf_counter() - began
print(json.dumps({"train": trained["seconds"], "encode": build - trained["seconds"], "tokens": len(first.cache.tokens),
                  "characters": first.cache.characters}))
"""

SETUP = """
import json, sys, time
t0 = time.perf_counter()
import torch
from shakespeare.data.datamodule import ShakespeareDataModule
path, cache, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
began = time.perf_counter()
dm = ShakespeareDataModule(path=path, cache_dir=cache, unit="bpe", vocab_size=size)
dm.setup()
print(json.dumps({"setup": time.perf_counter() - began}))
"""


def corpus(megabytes: float | None, path: str | None, folder: Path) -> Path:
    """The text to measure: `path`, or tinyshakespeare, repeated to `megabytes` when given."""
    from tests.harness import REAL_CORPUS

    source = Path(path) if path else REAL_CORPUS
    if source is None:
        sys.exit("No text: pass --path, or set SHAKESPEARE_CORPUS=/path/to/tinyshakespeare.txt.")
    if not megabytes:
        return source
    text = source.read_text(encoding="utf-8")
    repeated = folder / f"{source.stem}_{megabytes:g}MB.txt"
    repeated.write_text((text * (int(megabytes * 1e6) // len(text) + 1))[: int(megabytes * 1e6)], encoding="utf-8")
    return repeated


def run(script: str, *args: str) -> tuple[dict, float]:
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="the text (default: tinyshakespeare)")
    parser.add_argument("--megabytes", type=float, help="repeat the text to this many megabytes")
    parser.add_argument("--vocab-sizes", default="512,2048")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        text = corpus(args.megabytes, args.path, Path(folder))
        print(f"{text.name}: {text.stat().st_size / 1e6:.1f} MB, load average {os.getloadavg()[0]:.2f}")
        print("| vocabulary | characters | tokens | train | encode | set-up from the cache | with imports |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for size in map(int, args.vocab_sizes.split(",")):
            cache = str(Path(folder) / f"cache-{size}")
            built, _ = run(MEASURE, str(text), cache, str(size))
            setup, whole = run(SETUP, str(text), cache, str(size))
            print(
                f"| {size:,} | {built['characters']:,} | {built['tokens']:,} | {built['train']:.2f} s | "
                f"{built['encode']:.2f} s | {setup['setup']:.3f} s | {whole:.2f} s |",
                flush=True,
            )
        print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
