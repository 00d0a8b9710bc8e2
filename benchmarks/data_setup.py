"""Data setup at scale: the token cache against the data path it replaced, each figure beside its baseline.

    python benchmarks/data_setup.py                       # everything: about 2.5 GB of /tmp, removed at the end
    python benchmarks/data_setup.py --only setup,throughput --sizes 10,100
    python benchmarks/data_setup.py --baseline <commit>   # the data path of another commit as the baseline

Texts are tinyshakespeare ($SHAKESPEARE_CORPUS, else the cached download) repeated to size in a temporary
folder; each scenario's text starts with its own line, so a "first time" finds no cache. Setups run in fresh
processes, so their memory is theirs alone. The baseline is `shakespeare/data.py` of the commit before the
token cache (or --baseline), loaded beside the current code. Figures, each with the load average:

  setup       DataModule.setup() seconds, first time and from the token cache, and its peak RSS growth over
              the imports per character (targets at 100 MB: <= 5 s and <= 3 bytes first, <= 1 s and <= 0.1 cached)
  big         a cached 1 GB text trains one step: peak RSS of `python train.py` (target < 3 GB)
  ddp         two DDP ranks (gloo) on a fresh 100 MB text, started by Lightning and by torchrun (together):
              how many times it was encoded (target 1)
  throughput  tinyshakespeare training steps fed by the token cache vs the baseline's loader, interleaved
              in one process (target: within 5%)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MB = 10**6
TINY = [
    "model=bigram",
    "trainer.max_epochs=-1",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "callbacks.generation_sample.max_new_tokens=0",
    "callbacks.research_log.sample_length=0",
]


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load ?"


def status(field: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def make_text(path: Path, size: int, corpus: Path, label: str) -> Path:
    """`size` bytes of the corpus repeated, after a first line naming the scenario."""
    block = corpus.read_bytes()
    with open(path, "wb") as out:
        out.write(f"{label}\n".encode())
        written = len(label) + 1
        while written < size:
            part = block[: size - written]
            out.write(part)
            written += len(part)
    return path


def baseline_module(rev: str, folder: Path) -> tuple[Path | None, str]:
    """The baseline's data.py as a file: `rev`'s, or that of the commit before the token cache landed."""
    try:
        if rev == "auto":
            added = subprocess.run(
                ["git", "log", "--diff-filter=A", "--format=%H", "--", "shakespeare/token_cache.py"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            rev = f"{added[-1][:10]}^" if added else "HEAD"
        source = subprocess.run(
            ["git", "show", f"{rev}:shakespeare/data.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError, IndexError):
        return None, rev
    if "token_cache" in source:
        return None, rev
    path = folder / "baseline_data.py"
    path.write_text(source)
    return path, rev


def import_baseline(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_setup(text: str, cache: str, baseline: str | None) -> None:
    """In a fresh process: time one DataModule.setup() and measure its peak RSS growth over the imports."""
    import lightning  # noqa: F401  the imports a run has anyway
    import torch  # noqa: F401

    if baseline:
        module = import_baseline(Path(baseline))
        data = module.ShakespeareDataModule(path=text)
    else:
        from shakespeare.data.datamodule import ShakespeareDataModule

        data = ShakespeareDataModule(path=text, cache_dir=cache)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
        before = status("VmRSS")
    except OSError:
        before = status("VmHWM")
    start = time.perf_counter()
    data.setup()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "growth": max(0, status("VmHWM") - before)}))


def run_setup(text: Path, cache: Path, baseline: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child-setup", str(text), str(cache)]
    command += ["--child-baseline", str(baseline)] if baseline else []
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"setup failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def target_setup(args, tmp: Path, corpus: Path, baseline: Path | None) -> None:
    print("\n1. DataModule.setup() of tinyshakespeare repeated to size, sequence_length 8, each in a fresh process;")
    print("   peak RSS growth over the imports per character. Targets at 100 MB: first <= 5 s and <= 3 B/char, cached")
    print("   <= 1 s and <= 0.1 B/char (the baseline re-reads and re-encodes every time)", flush=True)
    for size in args.sizes:
        text = make_text(tmp / f"setup-{size}.txt", size * MB, corpus, f"setup {size} MB {time.time()}")
        cache = tmp / f"cache-setup-{size}"
        first, cached = run_setup(text, cache), run_setup(text, cache)
        line = (
            f"   {size:5d} MB  first {first['seconds']:6.2f} s {first['growth'] / (size * MB):5.2f} B/char"
            f"   cached {cached['seconds']:6.2f} s {cached['growth'] / (size * MB):6.3f} B/char"
        )
        if baseline:
            old = run_setup(text, cache, baseline)
            line += (
                f"   baseline {old['seconds']:6.2f} s {old['growth'] / (size * MB):5.2f} B/char"
                f"  ({old['seconds'] / first['seconds']:.1f}x / {old['seconds'] / cached['seconds']:.0f}x faster)"
            )
        print(line + f"  [{load()}]", flush=True)
        text.unlink()
        shutil.rmtree(cache)


def peak_rss_of(command: list[str], env: dict, cwd: Path) -> tuple[int, str, int]:
    """Run `command` through a middleman whose only child it is: (peak RSS bytes, output, exit code)."""
    middleman = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(r.stdout + r.stderr); print(); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", middleman, *command], capture_output=True, text=True, env=env, cwd=cwd)
    *output, last = out.stdout.rstrip().splitlines()
    _, peak_kb, code = last.split()
    return int(peak_kb) * 1024, "\n".join(output), int(code)


def target_big(args, tmp: Path, corpus: Path) -> None:
    print(
        f"\n2. A cached {args.big} MB text trains one step (bigram, batch 1024): peak RSS of python train.py; "
        "target < 3 GB",
        flush=True,
    )
    text = make_text(tmp / "big.txt", args.big * MB, corpus, f"big {time.time()}")
    cache = tmp / "cache-big"
    first = run_setup(text, cache)
    print(
        f"   encoding it the first time: {first['seconds']:.1f} s, peak growth "
        f"{first['growth'] / (args.big * MB):.2f} B/char  [{load()}]",
        flush=True,
    )
    env = {**os.environ, "SHAKESPEARE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    peak, output, code = peak_rss_of(
        [sys.executable, "train.py", f"data.path={text}", *TINY, f"hydra.run.dir={tmp / 'run-big'}"], env, ROOT
    )
    if code:
        print(output[-3000:])
    print(
        f"   one step from the cache: peak RSS {peak / 2**30:.2f} GiB ({peak / (args.big * MB):.2f} B/char), "
        f"{time.perf_counter() - start:.1f} s for the whole command, exit {code}  "
        f"{'meets' if peak < 3 * 2**30 and not code else 'MISSES'}  [{load()}]",
        flush=True,
    )
    text.unlink()
    shutil.rmtree(cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_ddp(args, tmp: Path, corpus: Path) -> None:
    print(
        f"\n3. Two DDP ranks (gloo) on a fresh {args.ddp} MB text, one training step: encodings (target 1)", flush=True
    )
    launchers = {
        "Lightning's launcher": [sys.executable, "train.py"],
        "torchrun (ranks start together)": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={free_port()}",
            "train.py",
        ],
    }
    for name, launch in launchers.items():
        text = make_text(tmp / "ddp.txt", args.ddp * MB, corpus, f"ddp {name} {time.time()}")
        cache = tmp / "cache-ddp"
        env = {**os.environ, "SHAKESPEARE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        out = subprocess.run(
            [
                *launch,
                "trainer=ddp",
                "trainer.devices=2",
                f"data.path={text}",
                *TINY,
                f"hydra.run.dir={tmp / 'run-ddp'}",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        seconds = time.perf_counter() - start
        output = out.stdout + out.stderr
        encodings = output.count("Encoding ")
        caches = len(list((cache / "tokens").glob("*.bin")))
        if out.returncode:
            print(output[-3000:])
        print(
            f"   {name:32s} encodings {encodings}, cache files {caches}, {seconds:.1f} s for the whole command, "
            f"exit {out.returncode}  {'meets' if encodings == 1 and not out.returncode else 'MISSES'}  [{load()}]",
            flush=True,
        )
        text.unlink()
        shutil.rmtree(cache)
        shutil.rmtree(tmp / "run-ddp", ignore_errors=True)


def endless(loader):
    while True:
        yield from loader


def target_throughput(args, tmp: Path, corpus: Path, baseline: Path | None) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from shakespeare.data.datamodule import ShakespeareDataModule
    from shakespeare.run.composition import CONFIG_DIR
    from shakespeare.training.module import ShakespeareModule

    print("\n4. tinyshakespeare training steps (batch 1024, sequence 8, one thread) fed by the token cache vs the")
    print(
        "   baseline's loader; interleaved rounds, medians; the verdict uses CPU time, which neighbours disturb less."
    )
    print("   Target: within 5%", flush=True)
    if baseline is None:
        print("   (no baseline: not a git checkout, or --baseline names a commit with the token cache)")
        return
    torch.set_num_threads(1)
    loaders = {
        "cache": ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp / "cache-throughput")),
        "baseline": import_baseline(baseline).ShakespeareDataModule(path=str(corpus)),
    }
    for data in loaders.values():
        data.setup()
    batches = {name: endless(data.train_dataloader()) for name, data in loaders.items()}
    seconds = {name: [] for name in loaders}
    for repeat in range(args.repeats):
        for name in loaders if repeat % 2 else reversed(loaders):
            start = time.perf_counter()
            for _ in range(500):
                next(batches[name])
            seconds[name].append(time.perf_counter() - start)
    rate = {name: 500 * 1024 / statistics.median(s) for name, s in seconds.items()}
    print(
        f"   {'loader alone':20s} cache {rate['cache'] / 1e6:8.2f}M windows/s baseline {rate['baseline'] / 1e6:6.2f}M "
        f"windows/s  {rate['cache'] / rate['baseline']:.3f}x  [{load()}]",
        flush=True,
    )
    for rung, steps in (("bigram", 300), ("block_norm_dropout", 40)):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            model = OmegaConf.to_container(compose("train", overrides=[f"model={rung}"]).model, resolve=True)
        batches = {name: endless(data.train_dataloader()) for name, data in loaders.items()}
        modules = {
            name: ShakespeareModule(
                loaders["cache"].tokenizer.vocabulary, model, {"_target_": "torch.optim.Adam", "lr": 1e-3}
            )
            for name in loaders
        }
        optimizers = {name: torch.optim.Adam(module.parameters(), lr=1e-3) for name, module in modules.items()}
        wall, cpu = {name: [] for name in loaders}, {name: [] for name in loaders}
        for repeat in range(args.repeats):
            for name in loaders if repeat % 2 else reversed(loaders):  # A B B A ...: neither side always goes first
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    x, y = next(batches[name])
                    loss = modules[name].model.loss(x, y)
                    optimizers[name].zero_grad()
                    loss.backward()
                    optimizers[name].step()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        rate = {name: steps * 1024 * 8 / statistics.median(s) for name, s in wall.items()}
        cpu_ratio = statistics.median(cpu["baseline"]) / statistics.median(cpu["cache"])
        print(
            f"   {rung:20s} cache {rate['cache'] / 1e3:8.1f}k tokens/s  baseline {rate['baseline'] / 1e3:8.1f}k tokens/s"
            f"  {rate['cache'] / rate['baseline']:.3f}x (per CPU second {cpu_ratio:.3f}x)  "
            f"{'meets' if abs(cpu_ratio - 1) <= 0.05 else 'MISSES'}  [{load()}]",
            flush=True,
        )


def corpus_path() -> Path:
    if os.environ.get("SHAKESPEARE_CORPUS"):
        return Path(os.environ["SHAKESPEARE_CORPUS"])
    from omegaconf import OmegaConf

    from shakespeare.data.corpus import fetch_corpus

    data = OmegaConf.load(ROOT / "conf" / "data" / "shakespeare.yaml")
    cache = os.environ.get("SHAKESPEARE_CACHE", "~/.cache/shakespeare")
    return fetch_corpus(data.url, data.sha256, cache, data.file)


TARGETS = ("setup", "big", "ddp", "throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--sizes", default="10,100", help="MB of text for the setup target")
    parser.add_argument("--big", type=int, default=1000, help="MB of text for the one-step target")
    parser.add_argument("--ddp", type=int, default=100, help="MB of text for the DDP target")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--baseline", default="auto", help="commit whose data.py is the baseline (auto: before the cache)"
    )
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the texts and caches are written")
    parser.add_argument("--child-setup", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_setup:
        return child_setup(*args.child_setup, args.child_baseline)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    only = args.only.split(",")
    needed = 2.2 * (args.big * MB if "big" in only else 0) + 2.2 * max(args.sizes + [args.ddp]) * MB
    free = shutil.disk_usage(args.tmp).free
    if free < needed + 1e9:
        raise SystemExit(
            f"{args.tmp} has {free / 1e9:.1f} GB free; this needs about {needed / 1e9:.1f} GB. "
            "Pass --tmp DIR, a smaller --big, or --only without big."
        )
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {free / 1e9:.0f} GB free in {args.tmp}, {load()}")
    corpus = corpus_path()
    tmp = Path(tempfile.mkdtemp(prefix="data-setup-", dir=args.tmp))
    try:
        baseline, rev = baseline_module(args.baseline, tmp)
        print(f"baseline: {f'shakespeare/data.py of {rev}' if baseline else f'none ({rev} has the token cache)'}")
        for name in only:
            if name == "setup":
                target_setup(args, tmp, corpus, baseline)
            elif name == "big":
                target_big(args, tmp, corpus)
            elif name == "ddp":
                target_ddp(args, tmp, corpus)
            elif name == "throughput":
                target_throughput(args, tmp, corpus, baseline)
            else:
                raise SystemExit(f"--only {name}: choose from {', '.join(TARGETS)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
