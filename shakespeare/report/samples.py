"""Every run's sample from the same prompt and seed, so the ladder reads as prose getting better."""

from __future__ import annotations

import re
import sys

from shakespeare.errors import UsageError
from shakespeare.report.figures import labels
from shakespeare.report.runs import Run
from shakespeare.report.seeds import configuration_key
from shakespeare.tokenizer import printable


def sample_run(run: Run, prompt: str, seed: int, length: int) -> str:
    """The run's continuation of `prompt`: its best checkpoint, seeded with `seed` (characters the model
    never saw are left out of the prompt)."""
    import torch

    from shakespeare.model.loading import load_generator
    from shakespeare.model.sampling import sample

    model, tokenizer = load_generator(run.checkpoint())
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a chain of small calls: one thread is fastest, and 2+ stall beside any busy process
    try:
        return sample(model, tokenizer, prompt, max_new_tokens=length, generator=generator, on_unknown="skip")[0]
    finally:
        torch.set_num_threads(threads)


def samples_section(runs: list[Run], prompt: str = "", seed: int = 0, length: int = 300) -> str:
    """Markdown: every configuration's sample from the same prompt and seed, in the table's (ladder) order; of
    runs that differ only in their training seed, the first one's."""
    shown = f"the prompt {prompt!r}" if prompt else "the empty prompt"
    text = f"## Samples\n\nEach run's best checkpoint continues {shown} with seed {seed} ({length} tokens each):\n"
    chosen, configurations = [], set()
    for run, label in zip(runs, labels(runs)):
        key = configuration_key(run) if run.config and run.checkpoint() is not None else id(run)
        if key not in configurations:  # another seed of a configuration already sampled says nothing new
            configurations.add(key)
            chosen.append((run, label))
    sampled = [run for run, _ in chosen if run.checkpoint() is not None]
    for run, label in chosen:
        text += f"\n### {label} ({run.name})\n\n"
        if run.checkpoint() is None:
            text += "No checkpoint to sample from.\n"
            continue
        print(f"Sampling {sampled.index(run) + 1}/{len(sampled)}: {run.name}", file=sys.stderr, flush=True)
        try:
            written = printable(prompt + sample_run(run, prompt, seed, length))
        except UsageError as err:
            text += f"No sample: {err}\n"
            continue
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", written)), default=0))
        text += f"{fence}text\n{written}\n{fence}\n"
    return text
