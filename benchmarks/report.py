"""The report of a 36-run sweep (12 configurations x 3 seeds) in under 5 seconds.

    python benchmarks/report.py [--repeats 3]

Trains the sweep first (tiny runs: four rungs, three learning rates, three seeds, a few batches each; about a
minute), then times the whole report command as users type it, `python -m shakespeare.report <sweep>` (its
table, seed statistics, yardsticks, plot and one sample per configuration), best of --repeats, with the load
average. Target: under 5 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [
    "-m",
    "model=bigram,head,multihead,multihead_ffn",
    "optimizer.lr=0.001,0.003,0.01",
    "seed=1,2,3",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "data.batch_size=64",
    "host.threads=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    corpus = os.environ.get("SHAKESPEARE_CORPUS") or str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    folder = Path(tempfile.mkdtemp(prefix="report-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHAKESPEARE_CACHE": str(folder / "cache")}
    try:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *SWEEP, f"data.path={corpus}"],
            cwd=folder,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        [sweep] = (folder / "outputs" / "multiruns").glob("*/*")
        jobs = [job for job in sweep.iterdir() if job.is_dir() and not job.name.startswith(".")]
        print(f"{len(jobs)} runs trained in {time.perf_counter() - started:.0f} s", flush=True)
        seconds = []
        for _ in range(args.repeats):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "shakespeare.report", str(sweep)],
                cwd=folder,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            seconds.append(time.perf_counter() - start)
            print(f"  report: {seconds[-1]:.2f} s (load average {load:.2f})", flush=True)
        best = min(seconds)
        print(
            f"best of {args.repeats}: {best:.2f} s for {len(jobs)} runs (target < 5 s: {'met' if best < 5 else 'missed'})"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
