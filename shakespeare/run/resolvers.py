"""The resolvers conf/train.yaml's interpolations call: the run folder a resumed run continues, folder names that
paste back, the overrides as typed, and the ladder for `--help`. Registered on import (by the train command)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from shakespeare.errors import UsageError
from shakespeare.run.checkpoints import find_run
from shakespeare.run.checks import group_help, rung_help
from shakespeare.run.folders import folder_name, unescaped
from shakespeare.run.sweep import show_typed_overrides


def resumed_run(ckpt_path: str | None, log_dir: str) -> Path | None:
    """The folder a resumed run (ckpt_path=last, a run folder or its checkpoint) continues in (hydra.run.dir),
    with its Hydra record beside the original one (hydra.output_subdir); see conf/hydra/default.yaml."""
    try:
        return find_run(ckpt_path, log_dir)
    except UsageError:  # fit() raises it again, as a one-paragraph message instead of Hydra's traceback
        return None


def seed_tag(overrides: list[str]) -> str:
    """`_seed-7` for a run whose command sets seed=7 (a sweep's job names hold it already), else nothing."""
    seeds = [str(o).split("=", 1)[1] for o in overrides if str(o).split("=", 1)[0].lstrip("+") == "seed"]
    return f"_seed-{folder_name(seeds[-1])}" if seeds else ""


def register() -> None:
    resolvers = {
        "run_dir": lambda ckpt_path, log_dir, new: str(resumed_run(ckpt_path, log_dir) or new),
        "hydra_subdir": lambda ckpt_path, log_dir, now: (
            f".hydra/resumed-{now}" if resumed_run(ckpt_path, log_dir) else ".hydra"
        ),
        "folder_name": folder_name,  # sweep jobs' and runs' folders: they paste back unquoted
        "typed_overrides": lambda overrides: [unescaped(str(o)) for o in overrides],  # the research log's command
        "seed_tag": seed_tag,  # a run trained with another seed says so in its folder's name
        "rung_help": rung_help,  # python train.py --help
        "group_help": group_help,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, use_cache=True, replace=True)
    show_typed_overrides()  # the sweep log's job lines, as typed


register()
