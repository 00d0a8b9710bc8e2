"""Equal time that load cannot bend: two runs of the same rung in the equal-time mode, the second beside busy
neighbour processes (Python loops spinning, one a core: two on a 2-core machine), end within 0.01 of each other.

    python benchmarks/equal_time.py [--budget 00:00:01:00] [--rung qk_norm] [--threads 1] [--neighbours 2]

The first run measures the reference rung's quiet step time (a fresh cache folder: nothing is reused from
earlier runs) and trains the steps the budget buys; the second measures its speed against the reference beside
the neighbour and trains the steps that buys. Printed: each run's steps, its measured ratio, its wall time, its
validation loss at the budget, the load average during it, and the difference. Target: within 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> str:
    found = os.environ.get("SHAKESPEARE_CORPUS") or str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    if not Path(found).is_file():
        sys.exit("Set SHAKESPEARE_CORPUS=/path/to/tinyshakespeare.txt (the run's text).")
    return found


def train(args: argparse.Namespace, out: Path, cache: Path) -> tuple[dict, float, float, float]:
    """One equal-time run: its calibration record, its final validation loss, wall seconds, mean load."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=modern_ladder",
        f"rung={args.rung}",
        f"equal_time.budget={args.budget}",
        "trainer.max_time=null",
        f"host.threads={args.threads}",
        f"data.path={corpus()}",
        f"hydra.run.dir={out}",
        "callbacks.generation_sample.max_new_tokens=0",
        "callbacks.research_log.sample_length=0",
    ]
    env = {**os.environ, "SHAKESPEARE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    start, loads = time.perf_counter(), []
    process = subprocess.Popen(
        command, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while process.poll() is None:
        loads.append(os.getloadavg()[0])
        time.sleep(2)
    if process.returncode:
        sys.exit(f"the run failed:\n{process.stderr.read()[-3000:]}")
    wall = time.perf_counter() - start
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    final = events.Scalars("val/loss")[-1].value
    return json.loads((out / "calibration.json").read_text()), final, wall, sum(loads) / max(len(loads), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="00:00:01:00")
    parser.add_argument("--rung", default="qk_norm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--neighbours", type=int, default=2, help="busy processes beside the second run (one a core)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="equal_time-"))
    try:
        cache = folder / "cache"
        print(
            f"{os.cpu_count()} CPUs, {args.threads} thread(s), rung {args.rung}, budget {args.budget}; "
            f"load average at the start {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        quiet = train(args, folder / "quiet", cache)
        neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.neighbours)]
        try:
            time.sleep(1)
            busy = train(args, folder / "busy", cache)
        finally:
            for neighbour in neighbours:
                neighbour.kill()
        for name, (record, loss, wall, load) in (("quiet", quiet), (f"beside {args.neighbours} busy", busy)):
            print(
                f"  {name:24} {record['steps']:6,} steps (step {record['ratio']:.3f}x the reference's; quiet reference "
                f"step {record['reference_quiet_step'] * 1000:.1f} ms{', measured now' if record['measured_quiet_now'] else ''})"
                f"  val loss {loss:.4f}  wall {wall:.0f} s  mean load {load:.2f}"
            )
        difference = abs(quiet[1] - busy[1])
        print(f"difference {difference:.4f} (target <= 0.01: {'met' if difference <= 0.01 else 'missed'})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
