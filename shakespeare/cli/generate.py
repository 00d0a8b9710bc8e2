"""The generate command: a checkpoint writes text to the terminal as it is sampled.

It imports torch and Hydra but not Lightning, so it starts in a fraction of the time `train.py` takes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import hydra
import torch
from omegaconf import DictConfig

from shakespeare.errors import UsageError, explained_exit
from shakespeare.model.loading import load_generator
from shakespeare.model.sampling import ON_UNKNOWN, Seed, check_options, stream
from shakespeare.ranges import ranges_of, rule_of
from shakespeare.run.composition import CONFIG_DIR, explained_composition
from shakespeare.run.folders import checkpoint_of
from shakespeare.run.host import check_device, set_threads
from shakespeare.run.schema import check_types, parameters
from shakespeare.tokenizer import printable

log = logging.getLogger("shakespeare")


# conf/generate.yaml's keys, their types and their ranges, checked before anything is read: the sampling
# options' from check_options, torch's threads' from set_threads (train.py's host.threads)
OPTIONS = parameters(check_options)
SETTINGS = {
    **OPTIONS.types,
    "ckpt_path": str | None,
    "log_dir": str,
    "prompt": str | int | float | None,  # prompt=1234 reaches us as a number; it is written as text
    "seed": int | None,
    "on_unknown": Literal[ON_UNKNOWN],
    "device": str,
    "threads": parameters(set_threads).types["threads"],
    "raw": bool,
}
RANGES = {
    **{key: rule for key, (rule, _) in OPTIONS.ranges.items()},
    "seed": rule_of(Seed),
    "threads": ranges_of(set_threads)["threads"][0],
}


def write_samples(cfg: DictConfig, out: TextIO = sys.stdout) -> list[str]:
    """Sample from `cfg.ckpt_path` as `cfg` describes, streaming the text to `out`; returns the samples."""
    check_types(cfg, SETTINGS, RANGES)
    options = {key: cfg[key] for key in ("max_new_tokens", "temperature", "top_k", "num_samples", "context")}
    check_options(**options)
    if not cfg.ckpt_path:
        raise UsageError(
            "ckpt_path is not set. Pass the checkpoint to write with, e.g. "
            "ckpt_path=outputs/<date>/<time>_<rung>/checkpoints/best.ckpt, a run folder, or last (the newest run)."
        )
    set_threads(cfg.threads)
    device = check_device(cfg.device)
    model, tokenizer = load_generator(checkpoint_of(cfg.ckpt_path, cfg.log_dir), map_location=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed) if cfg.seed is not None else generator.seed()
    prompt = "" if cfg.prompt is None else str(cfg.prompt).replace("\\n", "\n")  # a typed \n is a line break
    steps = stream(model, tokenizer, prompt, generator=generator, on_unknown=cfg.on_unknown, **options)
    prompt = "".join(ch for ch in prompt if ch not in tokenizer.unknown(prompt))  # as the model read it
    shown = (lambda text: text) if cfg.raw else printable  # raw=true: control characters too, e.g. for a file
    texts: list[list[str]] = [[] for _ in range(cfg.num_samples)]
    if cfg.num_samples == 1:  # one sample streams character by character
        out.write(shown(prompt))
        for (ch,) in steps:
            out.write(shown(ch))
            out.flush()
            texts[0].append(ch)
        out.write("\n")
    else:  # the samples are generated side by side, so each is printed once all are done
        for chars in steps:
            for text, ch in zip(texts, chars):
                text.append(ch)
        for i, text in enumerate(texts, 1):
            out.write(f"---------- Sample {i}/{cfg.num_samples}:\n{shown(prompt + ''.join(text))}\n")
    out.flush()
    return ["".join(text) for text in texts]


def generate() -> None:
    """`python generate.py`: a config Hydra cannot compose is one paragraph and exit 2; then `run`."""
    with explained_composition("generate", "generate.py"):
        run()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def run(cfg: DictConfig) -> None:
    """`python generate.py ckpt_path=... prompt=...`: stream a trained model's text to the terminal."""
    try:
        with explained_exit():
            write_samples(cfg)
    except BrokenPipeError:  # e.g. `python generate.py ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
