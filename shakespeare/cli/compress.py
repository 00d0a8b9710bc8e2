"""The compress command: a trained model compresses a file losslessly, and decompresses it, by range coding each
token under the model's prediction for it (shakespeare/evaluation/coding.py).

It imports torch and Hydra but not Lightning, so it starts as quickly as `generate.py`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal, TextIO

import hydra
from omegaconf import DictConfig

from shakespeare.errors import UsageError, explained_exit
from shakespeare.evaluation.coding import SUFFIX, Outcome, check_paths, compress_file, decompress_file
from shakespeare.model.loading import load_generator, resolve_checkpoint
from shakespeare.model.sampling import CONTEXTS
from shakespeare.ranges import ranges_of
from shakespeare.run.composition import CONFIG_DIR, explained_composition
from shakespeare.run.folders import checkpoint_of
from shakespeare.run.host import set_threads
from shakespeare.run.schema import check_types, parameters

log = logging.getLogger("shakespeare")

MODES = ("compress", "decompress")
# conf/compress.yaml's keys, their types and their ranges, checked before any file is read
SETTINGS = {
    "mode": Literal[MODES],
    "ckpt_path": str | None,
    "log_dir": str,
    "input": str | None,
    "output": str | None,
    "overwrite": bool,
    "context": Literal[CONTEXTS],
    "threads": parameters(set_threads).types["threads"],
}
RANGES = {"threads": ranges_of(set_threads)["threads"][0]}


def paths_of(cfg: DictConfig) -> tuple[Path, Path]:
    """The input file and the output: as named, or, when none is, the input with `.shkz` added (compress) or
    taken off (decompress)."""
    if not cfg.input:
        raise UsageError(f"input is not set. Pass the file to {cfg.mode}, e.g. input=notes.txt.")
    source = Path(cfg.input).expanduser()
    if cfg.output:
        return source, Path(cfg.output).expanduser()
    if cfg.mode == "compress":
        return source, source.with_name(source.name + SUFFIX)
    if source.suffix != SUFFIX:
        raise UsageError(
            f"output is not set, and input={cfg.input!r} does not end in {SUFFIX}: name the file to write."
        )
    return source, source.with_suffix("")


def progress_on(stream: TextIO):
    """A progress report for long texts, rewritten in place on a terminal; nothing elsewhere (logs, pipes)."""
    if not stream.isatty():
        return None

    def report(done: int, total: int) -> None:
        stream.write(f"\r{done:,} / {total:,} tokens ({100 * done / max(total, 1):.0f}%)")
        stream.flush()

    return report


def code(cfg: DictConfig, out: TextIO = sys.stdout) -> Outcome:
    """Compress or decompress as `cfg` says; prints the summary (sizes, bits per token, speed) to `out`."""
    check_types(cfg, SETTINGS, RANGES)
    if not cfg.ckpt_path:
        raise UsageError(
            "ckpt_path is not set. Pass the checkpoint to code with, e.g. ckpt_path=outputs/<date>/<time>_<rung>, "
            "a checkpoint file, or last (the newest run): decompression needs the very one that compressed."
        )
    source, target = paths_of(cfg)
    check_paths(source, target, cfg.overwrite)  # before the model is read
    checkpoint = resolve_checkpoint(checkpoint_of(cfg.ckpt_path, cfg.log_dir))
    set_threads(cfg.threads)
    model, tokenizer = load_generator(checkpoint)  # on the CPU, where every run rounds alike
    run = compress_file if cfg.mode == "compress" else decompress_file
    progress = progress_on(sys.stderr)
    try:
        outcome = run(model, tokenizer, checkpoint, source, target, cfg.context, cfg.overwrite, progress)
    finally:
        if progress is not None:
            sys.stderr.write("\r\033[K")
    out.write(outcome.summary() + "\n")
    out.flush()
    return outcome


def compress() -> None:
    """`python compress.py`: a config Hydra cannot compose is one paragraph and exit 2; then `run`."""
    with explained_composition("compress", "compress.py"):
        run()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compress")
def run(cfg: DictConfig) -> None:
    """`python compress.py ckpt_path=... input=... output=... [mode=decompress]`."""
    with explained_exit():
        code(cfg)
