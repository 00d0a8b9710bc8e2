"""Time to quality: wall time from `python train.py experiment=...` starting to each validation loss on the
whole held-out text, against nanoGPT's CPU recipe (its README's command) measured in the same run.

    python benchmarks/speedrun.py                                   # experiment=cpu_speedrun
    python benchmarks/speedrun.py --nanogpt ~/src/nanoGPT           # + the baseline, run alternately with ours
    python benchmarks/speedrun.py --experiment cpu_speedrun --repeats 2 trainer.max_steps=3000

Targets (issue "Fast on a laptop CPU"): val loss <= 1.88 within 0.5x nanoGPT's wall time, <= 1.76 within
1x, <= 1.60 within 2.5x. nanoGPT's data must be prepared first (data/shakespeare_char/prepare.py); without
--nanogpt its time is taken as 71 s, measured on the 2-core machine this project was tuned on.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
               "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]
THRESHOLDS = ((1.88, 0.5), (1.76, 1.0), (1.60, 2.5))  # (val loss, allowed multiple of nanoGPT's wall time)


def run_ours(experiment: str, overrides: list[str], threads: int) -> tuple[float, list[tuple[float, int, float]]]:
    """Wall seconds of the whole command, and (seconds since start, step, val loss) of each validation."""
    with tempfile.TemporaryDirectory(prefix="speedrun-") as out:
        command = [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", f"paths.log_dir={out}",
                   f"trainer.threads={threads}", "trainer.enable_progress_bar=false", *overrides]
        start_wall, start = time.time(), time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=out)
        wall = time.perf_counter() - start
        events = EventAccumulator(str(next(Path(out).rglob("events.out.tfevents.*")).parent))
        events.Reload()
        points = [(e.wall_time - start_wall, e.step, e.value) for e in events.Scalars("val/loss")]
    return wall, points


def run_nanogpt(path: Path, threads: int) -> tuple[float, float]:
    """Wall seconds of nanoGPT's CPU recipe and its final validation loss."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "train.py", *NANOGPT_CPU], cwd=path, env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    return wall, float(re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", out)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="cpu_speedrun")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout with shakespeare_char prepared")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (trainer.threads)")
    args, overrides = parser.parse_known_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.2f}, {args.threads} thread(s)")
    baselines, runs = [], []
    for _ in range(args.repeats):
        if args.nanogpt:
            baselines.append(run_nanogpt(args.nanogpt.expanduser(), args.threads))
            print(f"nanoGPT CPU recipe: {baselines[-1][0]:.1f} s, val loss {baselines[-1][1]:.4f}", flush=True)
        runs.append(run_ours(args.experiment, overrides, args.threads))
        wall, points = runs[-1]
        curve = ", ".join(f"{s:.0f}s {v:.3f}" for s, _, v in points)
        print(f"experiment={args.experiment} {' '.join(overrides)}: {wall:.1f} s, val loss at {curve}", flush=True)
    reference = statistics.median(b[0] for b in baselines) if baselines else 71.0
    print(f"\nnanoGPT's wall time: {reference:.1f} s ({'measured above' if baselines else 'not measured here: 71 s'})")
    for loss, multiple in THRESHOLDS:
        reached = [next((s for s, _, v in points if v <= loss), None) for _, points in runs]
        if None in reached:
            best = min(v for _, points in runs for _, _, v in points)
            print(f"val loss <= {loss}: not reached (best {best:.4f})  target {multiple}x nanoGPT = {multiple * reference:.0f} s")
            continue
        seconds = statistics.median(reached)
        ratio = seconds / reference
        print(f"val loss <= {loss}: {seconds:6.1f} s = {ratio:.2f}x nanoGPT's time  (target <= {multiple}x)  "
              f"{'meets' if ratio <= multiple else 'MISSES'}")
    final = [points[-1][2] for _, points in runs]
    print(f"final val loss {statistics.median(final):.4f} after {statistics.median(w for w, _ in runs):.1f} s")


if __name__ == "__main__":
    main()
