"""CPU speed targets, each printed as a figure and a ratio against a baseline measured in the same run.

    python benchmarks/speed.py                      # all targets; --only fused,framework,data,allocator,flash,muon
    python benchmarks/speed.py --repeats 7 --threads 2

Variants are interleaved (A B A B ...) and repeated; figures are medians, so a busy neighbour slows both
sides of a ratio alike. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shakespeare.cli.train import fit  # noqa: E402
from shakespeare.run.composition import CONFIG_DIR  # noqa: E402
from shakespeare.run.host import keep_freed_memory  # noqa: E402
from shakespeare.tokenizer import PAD  # noqa: E402
from shakespeare.training.module import ShakespeareModule  # noqa: E402

RUNGS = ["multihead", "multihead_ffn", "block", "block_norm", "block_norm_dropout", "scale_up"]


def config(overrides: list[str], output_dir: str | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python train.py *overrides` would; `scale_up` names the experiment."""
    overrides = ["experiment=scale_up" if o == "model=scale_up" else o for o in overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = output_dir or tempfile.mkdtemp(prefix="speed-")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def verdict(ratio: float, target: float) -> str:
    return "meets" if ratio >= target else f"MISSES by {100 * (1 - ratio / target):.0f}%"


class Step:
    """One training step (forward, backward, optimizer) of a config's model on a real batch."""

    def __init__(self, overrides: list[str]):
        cfg = config(overrides)
        data = instantiate(cfg.data)
        data.setup()
        self.module = ShakespeareModule(
            data.tokenizer.vocabulary,
            OmegaConf.to_container(cfg.model, resolve=True),
            OmegaConf.to_container(cfg.optimizer, resolve=True),
        ).train()
        self.optimizer = instantiate(cfg.optimizer, params=self.module.parameters())
        self.batch = next(iter(data.train_dataloader()))

    def __call__(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.module.model.loss(*self.batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return (time.perf_counter() - start) / steps


def interleaved(variants: dict, repeats: int, steps: int) -> dict[str, float]:
    """Median ms per step of each variant, measured A B A B ... after one warm-up step each."""
    for step in variants.values():
        step(1)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            times[name].append(step(steps))
    return {name: median_ms(t) for name, t in times.items()}


def target_fused(args) -> None:
    print("\n1. Fused attention (one q/k/v Linear + scaled_dot_product_attention) vs the log's per-head modules,")
    print("   training step at data.batch_size=1024; target >= 1.10x at every rung from multihead up")
    for rung in args.rungs.split(","):
        steps = 1 if rung == "scale_up" else 10
        ms = interleaved(
            {"per-head": Step([f"model={rung}"]), "fused": Step([f"model={rung}", "model.fused_attention=true"])},
            args.repeats,
            steps,
        )
        ratio = ms["per-head"] / ms["fused"]
        print(
            f"   {rung:20s} per-head {ms['per-head']:8.1f} ms  fused {ms['fused']:8.1f} ms  {ratio:5.2f}x  "
            f"{verdict(ratio, 1.10)}",
            flush=True,
        )


def bare_loop(cfg: DictConfig, batches: int) -> float:
    """The same model, optimizer and batches as `fit`, in a plain PyTorch loop; seconds from the same start."""
    start = time.perf_counter()
    data = instantiate(cfg.data)
    data.setup()
    module = ShakespeareModule(
        data.tokenizer.vocabulary,
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.optimizer, resolve=True),
    ).train()
    optimizer = module.configure_optimizers()
    for i, (x, y) in enumerate(data.train_dataloader()):
        if i == batches:
            break
        loss = module.model.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def target_framework(args) -> None:
    batches = args.framework_batches
    print("\n2. Lightning's fit (the default trainer, callbacks, progress bar, TensorBoard) vs a bare PyTorch loop")
    print(f"   over the same model and batches: block_norm_dropout, {batches} batches, no validation; target <= 1.05x")
    overrides = [
        "model=block_norm_dropout",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={batches}",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.save_last=false",
    ]
    times = {"bare": [], "lightning": []}
    for _ in range(args.framework_repeats):
        times["bare"].append(bare_loop(config(overrides), batches))
        cfg = config(overrides)
        start = time.perf_counter()
        fit(cfg)
        times["lightning"].append(time.perf_counter() - start)
    bare, lightning = statistics.median(times["bare"]), statistics.median(times["lightning"])
    ratio = lightning / bare
    print(
        f"   bare {bare:.2f} s ({1e3 * bare / batches:.1f} ms/step)  lightning {lightning:.2f} s  {ratio:.3f}x  "
        f"{'meets' if ratio <= 1.05 else f'MISSES by {100 * (ratio - 1.05):.1f} points'}",
        flush=True,
    )


class PerWindow(torch.utils.data.Dataset):
    """The common baseline: one `__getitem__` per window, batched by the default collate."""

    def __init__(self, tokens: torch.Tensor, starts: torch.Tensor, T: int):
        self.tokens, self.starts, self.T = tokens, starts, T

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        return self.tokens[s : s + self.T], self.tokens[s + 1 : s + self.T + 1]


def windows_per_second(loader, windows: int | None = None) -> float:
    """Windows per second over `windows` windows, or a whole epoch (the epoch's shuffle included)."""
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
        if windows and seen >= windows:
            break
    return seen / (time.perf_counter() - start)


def target_data(args) -> None:
    print("\n3. Windows per second through the DataModule's train loader at T=64, a whole shuffled epoch;")
    print("   target >= 1M at the default data.batch_size=1024 (batch 32, the speedrun's, for information)")
    for batch_size in (1024, 32):
        data = instantiate(config(["data.sequence_length=64", f"data.batch_size={batch_size}"]).data)
        data.setup()
        baseline = torch.utils.data.DataLoader(
            PerWindow(data.cache.ids(), data.train_windows.all(), 64), batch_size=batch_size, shuffle=True
        )
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(windows_per_second(data.train_dataloader()))
            theirs.append(windows_per_second(baseline, 30_000))
        ours, theirs = statistics.median(ours), statistics.median(theirs)
        print(
            f"   batch {batch_size:5d}: SlidingWindows {ours / 1e6:5.2f}M/s  per-window Dataset + collate "
            f"{theirs / 1e6:5.2f}M/s  ({ours / theirs:.0f}x)  {verdict(ours / 1e6, 1.0) if batch_size == 1024 else ''}",
            flush=True,
        )


def worker(overrides: list[str], keep: bool, steps: int) -> None:
    """Run in a fresh process: time `steps` training steps and count their page faults."""
    if keep:
        keep_freed_memory()
    step = Step(overrides)
    step(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = step(steps)
    print(f"{seconds} {(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}")


def in_process(overrides: list[str], keep: bool, steps: int, threads: int) -> tuple[float, float]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--threads",
        str(threads),
        "--steps",
        str(steps),
        *(["--keep"] if keep else []),
        *overrides,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def target_allocator(args) -> None:
    print("\n4. The scale-up step (fused attention) with glibc's default malloc vs the allocator setting that")
    print("   `train.py` applies at start-up (freed memory kept for reuse); fresh processes, interleaved")
    if not sys.platform.startswith("linux"):
        print("   skipped: glibc only")
        return
    overrides = ["model=scale_up", "model.fused_attention=true"]
    runs = {False: [], True: []}
    for _ in range(args.repeats):
        for keep in (False, True):
            runs[keep].append(in_process(overrides, keep, 3, args.threads))
    (glibc, glibc_faults), (kept, kept_faults) = ([statistics.median(x) for x in zip(*runs[k])] for k in (False, True))
    print(f"   default malloc {1e3 * glibc:7.0f} ms/step {glibc_faults:9.0f} page faults/step")
    print(
        f"   kept memory    {1e3 * kept:7.0f} ms/step {kept_faults:9.0f} page faults/step  {glibc / kept:.2f}x",
        flush=True,
    )


def target_flash(args) -> None:
    print("\n5. Opt-in flash attention (model.attention_dropout=0.0, fused) at the scale-up shape; target >= 2x")
    ms = interleaved(
        {
            "per-head": Step(["model=scale_up"]),
            "fused": Step(["model=scale_up", "model.fused_attention=true"]),
            "flash": Step(["model=scale_up", "model.fused_attention=true", "model.attention_dropout=0.0"]),
        },
        args.repeats,
        1,
    )
    for name in ("per-head", "fused"):
        ratio = ms[name] / ms["flash"]
        print(f"   flash {ms['flash']:7.0f} ms vs {name:8s} {ms[name]:7.0f} ms  {ratio:5.2f}x  {verdict(ratio, 2.0)}")


def target_muon(args) -> None:
    """Muon's step alone on the speedrun recipes' matrices (random gradients): torch.optim.Muon one matrix at a time
    (with the same float32 iteration) against BatchedMuon, which stacks the matrices of a shape."""
    import torch.optim._muon as torch_muon

    from shakespeare.training.muon import BatchedMuon, newton_schulz

    print("\n6. Muon's Newton-Schulz batched by shape vs matrix by matrix (the optimizer step alone); target > 1.0x")
    own = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = lambda grad, *a: newton_schulz(grad[None], *a)[0]
    try:
        for experiment in ("cpu_speedrun_short", "cpu_speedrun"):  # 128- and 192-wide matrices
            cfg = config([f"experiment={experiment}"])
            model = ShakespeareModule(
                [PAD, *(chr(i) for i in range(32, 97))], OmegaConf.to_container(cfg.model, resolve=True), {}
            ).model
            matrices = [p for name, p in model.named_parameters() if p.ndim == 2 and name.startswith("blocks")]
            for p in matrices:
                p.grad = torch.randn_like(p)

            def stepper(optimizer):
                def step(steps: int) -> float:
                    start = time.perf_counter()
                    for _ in range(steps):
                        optimizer.step()
                    return (time.perf_counter() - start) / steps

                return step

            settings = dict(lr=0.02, weight_decay=0.1)
            ms = interleaved(
                {
                    "one by one": stepper(torch.optim.Muon(matrices, **settings)),
                    "batched": stepper(BatchedMuon(matrices, **settings)),
                },
                args.repeats,
                10,
            )
            ratio = ms["one by one"] / ms["batched"]
            print(
                f"   {experiment:20s} {len(matrices)} matrices: one by one {ms['one by one']:6.1f} ms  batched "
                f"{ms['batched']:6.1f} ms  {ratio:5.2f}x  {verdict(ratio, 1.0)}",
                flush=True,
            )
    finally:
        torch_muon._zeropower_via_newtonschulz = own


TARGETS = {
    "fused": target_fused,
    "framework": target_framework,
    "data": target_data,
    "allocator": target_allocator,
    "flash": target_flash,
    "muon": target_muon,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rungs", default=",".join(RUNGS), help="comma-separated rungs for the fused target")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (host.threads)")
    parser.add_argument("--framework-batches", type=int, default=300)
    parser.add_argument("--framework-repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(overrides, args.keep, args.steps)
    keep_freed_memory()  # as train.py does; the allocator target compares in fresh processes
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {load:.2f}")
    for name in args.only.split(","):
        TARGETS[name](args)


if __name__ == "__main__":
    main()
