"""Generation speed: characters/second for one stream of the cpu_speedrun_short model (4 x 128, context 128),
and what 16 streams cost.

generate.py's default (context=auto: the sliding-window cache on rotary rungs) against re-reading the cropped
window at every step (context=crop) and against the model as trained (every position's logits, heads one by one).

    python benchmarks/generation.py [--chars 1000] [--repeats 5] [--threads 1] [--experiment cpu_speedrun_short]
    python benchmarks/generation.py --experiment scale_up

An untrained model of the experiment's shape (its config composed from conf/): speed does not depend on the
weights. Each figure is the best of `--repeats` interleaved runs, so a busy machine disturbs it least;
figures per CPU-second (this process's CPU time) are printed too, as other processes sharing the cores
slow the wall clock but not them. Targets: >= 2,000 chars/s for one stream; 16 streams well under 16x
the time of one.
"""

from __future__ import annotations

import argparse
import os
import string
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shakespeare.model import sampling  # noqa: E402
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator  # noqa: E402
from shakespeare.tokenizer import PAD, CharTokenizer  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def experiment_model(experiment: str, vocab_size: int) -> ShakespeareGenerator:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return ShakespeareGenerator(GeneratorConfig(vocab_size=vocab_size, **model))


def seconds(model, tokenizer, chars: int, num_samples: int, context: str = "auto") -> tuple[float, float]:
    """Wall-clock and CPU seconds to sample `chars` characters in each of `num_samples` streams."""
    generator = torch.Generator().manual_seed(0)
    wall, cpu = time.perf_counter(), time.process_time()
    steps = sampling.stream(
        model, tokenizer, "", max_new_tokens=chars, num_samples=num_samples, generator=generator, context=context
    )
    for _ in steps:
        pass
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experiment", default="cpu_speedrun_short", help="the model shape: an experiment config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = CharTokenizer([PAD, *sorted(set(string.printable[:-5]))][:66])  # tinyshakespeare's 65 + pad
    model = experiment_model(args.experiment, len(tokenizer))
    cfg = model.cfg
    next_character = sampling.NextCharacter

    def whole_model(model):  # the baseline: the model as trained (heads one by one), every position's logits
        return lambda idx: model(idx)[:, -1]

    runs = {"default": [], "crop": [], "per_head": [], "x16": []}
    seconds(model, tokenizer, 100, 16)  # warm-up
    for _ in range(args.repeats):
        runs["default"].append(seconds(model, tokenizer, args.chars, 1))
        runs["x16"].append(seconds(model, tokenizer, args.chars, 16))
        runs["crop"].append(seconds(model, tokenizer, args.chars, 1, context="crop"))
        sampling.NextCharacter = whole_model
        runs["per_head"].append(seconds(model, tokenizer, args.chars, 1, context="crop"))
        sampling.NextCharacter = next_character
    print(
        f"model: {args.experiment} shape ({type(model.blocks[0].heads).__name__}), sequence {cfg.sequence_length}, embedding {cfg.embedding_size}, {cfg.num_heads} heads, "
        f"{cfg.num_blocks} block(s), vocabulary {cfg.vocab_size}; torch {torch.__version__}, {args.threads} thread(s); "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    for clock, i in (("wall clock", 0), ("CPU time", 1)):
        best = {name: min(t[i] for t in times) for name, times in runs.items()}
        one, ratio = args.chars / best["default"], best["x16"] / best["default"]
        reader = type(sampling.next_character_reader(model, "auto", 1)).__name__
        print(f"[{clock}]")
        print(
            f"  one stream:          {one:8,.0f} chars/s  ({reader}; target >= 2,000: {'met' if one >= 2000 else 'MISSED'})"
        )
        print(
            f"  context=crop:        {args.chars / best['crop']:8,.0f} chars/s  "
            f"(NextCharacter; the default is {best['crop'] / best['default']:.2f}x faster)"
        )
        print(
            f"  per-head baseline:   {args.chars / best['per_head']:8,.0f} chars/s  "
            f"(the default is {best['per_head'] / best['default']:.2f}x faster)"
        )
        print(
            f"  16 streams:          {16 * args.chars / best['x16']:8,.0f} chars/s in all; cost {ratio:.2f}x one stream "
            f"(target well under 16x: {'met' if ratio < 8 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
