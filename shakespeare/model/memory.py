"""Will a training step fit in memory? Estimated before the model is built, so a run that cannot fit is refused
with the estimate and the fix instead of meeting the allocator or the kernel's OOM killer part way.

The model is built on PyTorch's meta device (shapes, no storage) and runs one forward pass there; the
tensors autograd keeps for the backward pass are counted, whatever the rung. A step's peak was measured
at 1.5-3x those (the backward pass's gradients, dropout masks) plus the logits and their gradients, and
the parameters four times over (weights, gradients, Adam's two moments) with the optimizer's temporaries:
`python benchmarks/memory.py` compares the estimate with the measured peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator

GiB = 2**30
KEPT_FACTOR = 3  # a step's peak over the tensors kept for the backward pass (measured: 1.5-3x)
STATE_BYTES = 20  # per parameter: weights, gradients, Adam's two moments, the optimizer's temporaries (float32)


@dataclass
class StepMemory:
    """Bytes one training step needs at its peak, by part."""

    batch_size: int
    activations: int  # kept for the backward pass, with the backward pass's own
    logits: int  # the logits and their gradients
    parameters: int  # with their gradients and optimizer state

    @property
    def total(self) -> int:
        return self.activations + self.logits + self.parameters


def step_memory(model: GeneratorConfig, batch_size: int) -> StepMemory:
    """The estimate for one training step of `model` on `batch_size` windows (float32)."""
    kept = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor if tensor._base is None else tensor._base)
        return tensor

    with torch.device("meta"):
        net = ShakespeareGenerator(model)
        idx = torch.zeros(batch_size, model.sequence_length, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            net.loss(idx, idx)
    saved = sum(t.numel() * t.element_size() for t in {id(t): t for t in kept}.values())
    parameters = sum(p.numel() for p in net.parameters())
    return StepMemory(
        batch_size=batch_size,
        activations=KEPT_FACTOR * saved,
        logits=3 * batch_size * model.sequence_length * model.vocab_size * 4,  # and two gradients as large
        parameters=STATE_BYTES * parameters,
    )


def size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def available_memory(accelerator: str) -> tuple[int, str] | None:
    """Bytes free for a run on `accelerator`, and where: a CUDA GPU's free memory, else the RAM this process
    may still use (the kernel's MemAvailable, within a container's or SLURM job's cgroup limit). None where
    it cannot be read (macOS, Windows): the check is skipped there."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], "free on the GPU"
    free = []
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        if "MemAvailable" in fields:
            free.append(int(fields["MemAvailable"].split()[0]) * 1024)
    for limit, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            free.append(int(Path(limit).read_text()) - int(Path(used).read_text()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return (min(free), "available in RAM") if free else None


def model_sizes(model: GeneratorConfig) -> str:
    """The settings that size the model's parameters, the n-gram tables' first where it has them (they can dwarf
    the rest)."""
    ngrams = ["model.ngram_buckets", "model.ngrams"] if model.ngrams > 1 else []
    return ", ".join([*ngrams, "model.embedding_size", "model.num_blocks"]) + " or model.feed_forward_size"


def check_memory(
    model: GeneratorConfig, batch_size: int, processes: int = 1, accelerator: str = "cpu", asked: int | None = None
) -> StepMemory:
    """Refuse a run whose training step cannot fit in the memory free for it, naming the estimate and the
    largest data.batch_size that fits. `processes`: how many such steps share the memory (DDP on one CPU);
    `asked`: the data.batch_size the user set, when the text holds fewer windows (a batch is then all of them)."""
    need = step_memory(model, batch_size)
    free = available_memory(accelerator)
    if free is None or need.total * processes <= free[0]:
        return need
    room, where = free
    per_window = (need.activations + need.logits) / batch_size
    fits = math.floor((room / processes - need.parameters) / per_window)
    share = f" each, for {processes} processes" if processes > 1 else ""
    parts = (
        f"activations {size(need.activations)}, logits {size(need.logits)}, parameters with their gradients "
        f"and Adam's state {size(need.parameters)}"
    )
    fix = (
        f"Lower data.batch_size to at most {fits:,} (memory grows with it), or data.sequence_length, "
        "model.embedding_size or model.num_blocks."
        if fits >= 1
        else f"The model alone does not fit: lower {model_sizes(model)}."
    )
    batch = (
        f"data.batch_size={batch_size:,}"
        if asked in (None, batch_size)
        else (f"data.batch_size={asked:,}: a batch of all {batch_size:,} training windows the text has")
    )
    raise UsageError(
        f"This run needs about {size(need.total)} for one training step{share} ({batch}, "
        f"data.sequence_length={model.sequence_length}, model={model.name}: {parts}), but only {size(room)} "
        f"is {where}. {fix}"
    )
