"""Quality per CPU minute against nanoGPT's README CPU recipe: every figure of the speed targets in one run.

    python benchmarks/speedrun.py --nanogpt ~/src/nanoGPT                     # everything, about 50 minutes
    python benchmarks/speedrun.py --nanogpt ~/src/nanoGPT --parts ratios      # the three time-to-quality ratios
    python benchmarks/speedrun.py --parts ten,fifteen,ladder                  # no baseline needed for these

Parts (both sides use --threads torch threads, 2 by default; the load average is printed beside each figure):
- ratios: nanoGPT's CPU recipe (its README's command) is timed first. Then `experiment=cpu_speedrun_short` runs
  once per target with `trainer.max_time` set so that the whole command, start-up and final validation included,
  fits in the target's time (0.3x, 0.5x, 1.25x nanoGPT's): the best model that time buys on this machine. The
  start-up and wind-down are measured by a 1-second calibration run first. Figure: the time from the command
  starting to the validation loss on the whole held-out text reaching the target.
- ten: `python train.py experiment=cpu_speedrun` as users run it (its own budget): the best validation loss
  within 10 minutes of the command starting. Target <= 1.45.
- fifteen: `python train.py experiment=cpu_speedrun_15min` as users run it: the best validation loss within 15
  minutes. Target <= 1.40 (PPMd's 1.406 on the same held-out text, beaten by a static model).
- ladder: `python train.py -m experiment=modern_ladder` and the report's equal-budget table (val loss at the
  budget, gain over the rung before).

nanoGPT's data must be prepared first (data/shakespeare_char/prepare.py). Run it on a quiet machine: on 2
cores any neighbouring process bends every ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NANOGPT_CPU = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
RATIOS = ((1.88, 0.3), (1.76, 0.5), (1.60, 1.25))  # (val loss, allowed multiple of nanoGPT's wall time)
TEN_MINUTES, FIFTEEN_MINUTES = (1.45, 600.0), (1.40, 900.0)  # (val loss, seconds from the command starting)
PARTS = ("ratios", "ten", "fifteen", "ladder")


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load ?"


def train(args: list[str], threads: int, out: str) -> float:
    """Run `python train.py args` writing under `out`; returns its wall seconds."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        f"paths.log_dir={out}",
        f"host.threads={threads}",
        "trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=out)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - start


def run_ours(
    overrides: list[str], threads: int, experiment: str = "cpu_speedrun_short"
) -> tuple[float, list[tuple[float, int, float]]]:
    """Wall seconds of `python train.py experiment=<experiment> ...`, and (seconds since the command started,
    step, val loss) of each validation, in nats per character of the held-out text (`val/bpc` x ln 2): a
    character model's val/loss, and what a model of other tokens (tokens=bpe_512) is compared by."""
    with tempfile.TemporaryDirectory(prefix="speedrun-") as out:
        started = time.time()
        wall = train([f"experiment={experiment}", *overrides], threads, out)
        events = EventAccumulator(str(next(Path(out).rglob("events.out.tfevents.*")).parent))
        events.Reload()
        points = [(e.wall_time - started, e.step, e.value * math.log(2)) for e in events.Scalars("val/bpc")]
    return wall, points


def run_nanogpt(path: Path, threads: int) -> tuple[float, float]:
    """Wall seconds of nanoGPT's CPU recipe and its final validation loss."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "train.py", *NANOGPT_CPU], cwd=path, env=env, check=True, capture_output=True, text=True
    ).stdout
    wall = time.perf_counter() - start
    return wall, float(re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", out)[-1])


def curve(points: list[tuple[float, int, float]]) -> str:
    return ", ".join(f"{s:.0f}s {v:.3f}" for s, _, v in points)


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def ratios(nanogpt: Path, threads: int) -> list[str]:
    print(f"nanoGPT's CPU recipe ({load()}) ...", flush=True)
    reference, final = run_nanogpt(nanogpt.expanduser(), threads)
    print(f"nanoGPT CPU recipe: {reference:.1f} s, val loss {final:.4f}  ({load()})", flush=True)
    wall, _ = run_ours(["trainer.max_time={seconds:1}"], threads)
    overhead = wall - 1  # start-up before the first step, and the final validation, sample and checkpoint after it
    print(
        f"cpu_speedrun_short start-up and wind-down: {overhead:.1f} s (a 1-second budget took {wall:.1f} s)  ({load()})",
        flush=True,
    )
    lines = []
    for loss, multiple in RATIOS:
        target = multiple * reference
        budget = int(target - overhead - 1)  # whole seconds (Lightning's max_time); a second for the steps in flight
        if budget < 1:
            lines.append(
                f"val loss <= {loss} within {multiple}x nanoGPT's time ({target:.0f} s): MISSES (start-up alone takes {overhead:.0f} s)"
            )
            continue
        wall, points = run_ours([f"trainer.max_time={{seconds:{budget}}}"], threads)
        reached = next((s for s, _, v in points if v <= loss), None)
        best = min(v for _, _, v in points)
        print(
            f"cpu_speedrun_short trainer.max_time={budget}s: {wall:.1f} s, val loss at {curve(points)}  ({load()})",
            flush=True,
        )
        if reached is None:
            lines.append(
                f"val loss <= {loss} within {multiple}x nanoGPT's time ({target:.0f} s): not reached, best {best:.4f} "
                f"after {wall:.0f} s  MISSES  ({load()})"
            )
        else:
            lines.append(
                f"val loss <= {loss}: {reached:6.1f} s = {reached / reference:.2f}x nanoGPT's time (target <= {multiple}x; "
                f"best {best:.4f})  {verdict(reached <= target)}  ({load()})"
            )
    return lines


def within(name: str, experiment: str, threads: int, loss: float, seconds: float) -> list[str]:
    print(f"experiment={experiment} ({load()}) ...", flush=True)
    wall, points = run_ours([], threads, experiment)
    print(f"experiment={experiment}: {wall:.1f} s, val loss at {curve(points)}  ({load()})", flush=True)
    in_time = [v for s, _, v in points if s <= seconds]
    best = min(in_time) if in_time else float("nan")
    return [
        f"{name}: best val loss within {seconds / 60:.0f} min of the command starting: {best:.4f} (target <= {loss}; "
        f"the command took {wall:.0f} s)  {verdict(best <= loss)}  ({load()})"
    ]


def ladder(threads: int, overrides: list[str]) -> list[str]:
    from shakespeare.report.runs import load_runs
    from shakespeare.report.tables import budget_table

    with tempfile.TemporaryDirectory(prefix="modern-ladder-") as out:
        print(f"python train.py -m experiment=modern_ladder {' '.join(overrides)} ({load()}) ...", flush=True)
        wall = train(["-m", "experiment=modern_ladder", *overrides], threads, out)
        table = budget_table(load_runs(out))
    return [f"modern ladder ({wall:.0f} s in all, {load()}):", table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout with shakespeare_char prepared (for ratios)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both sides (host.threads)")
    parser.add_argument(
        "--ladder", nargs="*", default=[], help="overrides for the modern ladder, e.g. trainer.max_time=00:00:05:00"
    )
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--parts: {', '.join(sorted(unknown))} is not one of {', '.join(PARTS)}")
    if "ratios" in parts and not args.nanogpt:
        parser.error("--parts ratios needs --nanogpt DIR (a nanoGPT checkout with data/shakespeare_char prepared)")
    print(f"{os.cpu_count()} CPUs, {load()}, {args.threads} thread(s) each", flush=True)
    lines = []
    if "ratios" in parts:
        lines += ratios(args.nanogpt, args.threads)
    if "ten" in parts:
        lines += within("ten minutes", "cpu_speedrun", args.threads, *TEN_MINUTES)
    if "fifteen" in parts:
        lines += within("fifteen minutes", "cpu_speedrun_15min", args.threads, *FIFTEEN_MINUTES)
    if "ladder" in parts:
        lines += ladder(args.threads, args.ladder)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
