"""The memory check's estimate of a training step against the peak it measures, for several rungs and shapes.

    python benchmarks/memory.py            # every case; the last column should stay between about 1 and 2
    python benchmarks/memory.py BPE        # the cases whose names hold a word

Each case trains two steps (forward, backward, Adam) in a fresh process with train.py's allocator setting and
reports the rise of the process's peak resident memory; the ratio estimate / measured is what the refusal
of a run that cannot fit relies on (above 1: a run is refused a little early, never let through to the
kernel's OOM killer). Run it from the repository root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = {"attention": "multihead", "feed_forward": True, "residual": True, "layer_norm": True}
CASES = {
    "bigram, batch 8192 x 64": {"batch_size": 8192, "sequence_length": 64, "attention": "none"},
    "head, batch 2048 x 32": {"batch_size": 2048, "sequence_length": 32, "attention": "head"},
    "block_norm_dropout, batch 4096 x 8": {"batch_size": 4096, "sequence_length": 8, **BLOCK, "dropout": 0.1},
    "scale_up, batch 1024 x 64": {
        "batch_size": 1024,
        "sequence_length": 64,
        "embedding_size": 64,
        "num_heads": 8,
        **BLOCK,
        "dropout": 0.1,
    },
    "cpu_speedrun (flash), batch 64 x 64": {
        "batch_size": 64,
        "sequence_length": 64,
        "embedding_size": 128,
        "num_blocks": 4,
        **BLOCK,
        "fused_attention": True,
    },
    "cpu_speedrun (flash), BPE of 2048 tokens, batch 64 x 128": {
        "batch_size": 64,
        "sequence_length": 128,
        "embedding_size": 128,
        "num_blocks": 4,
        **BLOCK,
        "fused_attention": True,
        "vocab_size": 2048,  # the logits and the embedding tables grow with the vocabulary
    },
}

MEASURE = """
import json, resource, sys, torch
from shakespeare.run.host import keep_freed_memory
from shakespeare.model.memory import step_memory
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
keep_freed_memory()
torch.set_num_threads(1)
case = json.loads(sys.argv[1]); batch_size = case.pop("batch_size"); vocab_size = case.pop("vocab_size", 66)
cfg = GeneratorConfig(vocab_size=vocab_size, **case)
estimate = step_memory(cfg, batch_size).total
model = ShakespeareGenerator(cfg); optimizer = torch.optim.Adam(model.parameters())
idx = torch.randint(0, vocab_size, (batch_size, cfg.sequence_length))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    model.loss(idx, idx).backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
print(json.dumps({"estimate": estimate, "measured": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}))
"""


def main() -> None:
    print("| case | estimate (MiB) | measured peak (MiB) | estimate / measured |\n|---|---:|---:|---:|")
    chosen = [name for name in CASES if any(word in name for word in sys.argv[1:])] or list(CASES)
    for name, case in ((name, CASES[name]) for name in chosen):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, json.dumps(case)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        estimate, measured = figures["estimate"] / 2**20, figures["measured"] / 2**20
        print(f"| {name} | {estimate:,.0f} | {measured:,.0f} | {estimate / measured:.2f} |")


if __name__ == "__main__":
    main()
