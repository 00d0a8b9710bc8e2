"""Checkpoints that survive crashes: atomic writes that keep the previous last.ckpt, checks on reading,
exact resumption of a run folder."""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from shakespeare.errors import Fault, UsageError
from shakespeare.model.generator import GeneratorConfig
from shakespeare.model.loading import Unreadable, load_verified
from shakespeare.run.folders import newest_run, unescaped
from shakespeare.tokenizer import Tokenizer
from shakespeare.training.lines import budget_seconds

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"  # the last.ckpt before the current one, kept in case the current one rots
AUTO = "auto"  # ckpt_path=auto: this run folder's last.ckpt if it has one, else a fresh start


class CheckpointWriteError(Fault):
    """A checkpoint that could not be written (a full disk, a file-size limit); the one before it is intact."""

    def __init__(self, path: Path, err: OSError):
        self.path = path
        name = errno.errorcode.get(err.errno, "") if err.errno else ""
        super().__init__(
            f"Could not write the checkpoint {path} in {path.parent}: {err.strerror or err}"
            f"{f' ({name})' if name else ''}, so the run stopped and nothing half-written was left."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target, syncs it and renames it over the target, so a crash (even
    `kill -9`) leaves either the previous checkpoint or the new one, never a half-written file.

    The last.ckpt it replaces becomes last.prev.ckpt, so a last.ckpt damaged later (bit rot, a copy cut
    short) still leaves a readable checkpoint of the run. A failed write raises CheckpointWriteError.
    """

    def __init__(self) -> None:
        super().__init__()
        self._steps: dict[Path, int | None] = {}  # the global step this process last wrote to each path

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                torch.save(checkpoint, out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise CheckpointWriteError(path, err) from None
            raise
        step = checkpoint.get("global_step")
        if path.name == LAST and path.is_file() and self._steps.get(path) != step:  # not a rewrite of the same step
            keep_previous(path)
        os.replace(partial, path)
        self._steps[path] = step


def keep_previous(path: Path) -> None:
    """Make `path` also last.prev.ckpt, by a hard link so that `path` itself never goes missing."""
    previous, link = path.with_name(PREVIOUS), path.with_name(PREVIOUS + ".partial")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # a file system without hard links
        os.replace(path, previous)


class RandomState(L.Callback):
    """Carries the global random state (dropout draws from it) in the checkpoint, so a resumed run draws
    the very numbers the uninterrupted run would have drawn."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def find_run(ckpt_path: str | None, log_dir: str) -> Path | None:
    """The run folder a `ckpt_path` resumes in place: `last` (the newest run under `log_dir` with a
    last.ckpt), a run folder, or a checkpoint inside `<run>/checkpoints/`; None for any other checkpoint
    (and for `auto`, which resumes whatever folder this run has)."""
    if ckpt_path is None or ckpt_path == AUTO:
        return None
    if ckpt_path == "last":
        run = newest_run(log_dir, LAST)
        if run is None:
            raise UsageError(
                f"ckpt_path=last found no run to resume: no {Path(log_dir) / '<date>/<time>_<rung>/checkpoints'}/"
                f"{LAST}. Pass the run folder or checkpoint instead, e.g. ckpt_path=outputs/<date>/<time>_<rung>."
            )
        return run
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        if not (path / "checkpoints" / LAST).is_file():
            raise UsageError(
                f"ckpt_path={ckpt_path!r} is a folder without checkpoints/{LAST}, so there is nothing to resume. "
                "Pass a run folder (outputs/<date>/<time>_<rung>) or a .ckpt file."
            )
        return path
    if not path.is_file():
        raise UsageError(
            f"ckpt_path={ckpt_path!r} does not exist. Pass a checkpoint file, a run folder "
            "(outputs/<date>/<time>_<rung>) or ckpt_path=last (the newest run)."
        )
    return path.parent.parent if path.parent.name == "checkpoints" else None


def check_fixed_folder() -> None:
    """ckpt_path=auto resumes the run folder's own last.ckpt, which only means something when every
    start of the command uses the same folder: refuse it with the time-stamped default folder."""
    if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
        return  # a sweep job's folder is fixed by the sweep folder and the job's number
    if not any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in HydraConfig.get().overrides.hydra):
        raise UsageError(
            "ckpt_path=auto resumes the run folder's own checkpoints/last.ckpt, so every start of the command "
            "must use the same folder, but this run got a new time-stamped one. Name the folder: add "
            "hydra.run.dir=outputs/<name> (on SLURM e.g. hydra.run.dir=outputs/slurm-$SLURM_JOB_ID)."
        )


def resume_checkpoint(ckpt_path: str | None, output_dir: str, log_dir: str) -> Path | None:
    """The checkpoint file `ckpt_path` stands for: a file as is; a run folder's last.ckpt; for `last`, the
    last.ckpt of the run Hydra's `run_dir` resolver picked as this run's `output_dir`; for `auto`, this
    run folder's last.ckpt if there is one (a restarted run), else None (a fresh start)."""
    if ckpt_path is None:
        return None
    if ckpt_path == AUTO:
        check_fixed_folder()
        own = Path(output_dir) / "checkpoints" / LAST
        return own if own.exists() else None
    run = find_run(ckpt_path, log_dir)  # a missing path, or no run to resume: a clear error
    path = Path(ckpt_path).expanduser()
    if ckpt_path == "last":
        own = Path(output_dir) / "checkpoints" / LAST
        return own if own.is_file() else run / "checkpoints" / LAST
    return path / "checkpoints" / LAST if path.is_dir() else path


def newest_readable(folder: Path, but: Path) -> tuple[Path, int] | None:
    """The readable training checkpoint in `folder` (other than `but`) with the most steps, and its step."""
    found = []
    for candidate in sorted(folder.glob("*.ckpt")):
        if candidate == but:
            continue
        try:
            checkpoint = load_verified(candidate)
        except Unreadable:
            continue
        if isinstance(checkpoint, dict) and "loops" in checkpoint:
            found.append((checkpoint["global_step"], candidate.name == PREVIOUS, candidate))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint to resume (weights, optimizer and trainer state), or why `path` is not one in one paragraph
    (and, for a damaged checkpoint of a run, which of the run's checkpoints can be resumed instead)."""
    if not path.is_file():
        raise UsageError(
            f"ckpt_path: {str(path)!r} does not exist (a run folder with nothing to resume, or a mistyped path). "
            "Pass a checkpoint file, a run folder (outputs/<date>/<time>_<rung>) or ckpt_path=last."
        )
    try:
        checkpoint = load_verified(path)
    except Unreadable as err:
        raise UsageError(f"ckpt_path: {str(path)!r} cannot be resumed: {err}. {instead(path)}") from None
    if not isinstance(checkpoint, dict) or "loops" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UsageError(
            f"ckpt_path: {str(path)!r} is not a training checkpoint of this project (it lacks the trainer state). "
            "Pass a .ckpt written by train.py."
        )
    return checkpoint


def instead(path: Path) -> str:
    """What to resume instead of the damaged checkpoint `path`: the newest readable one beside it."""
    if path.parent.name != "checkpoints":
        return "Pass a .ckpt from a run's checkpoints/ folder."
    other = newest_readable(path.parent, but=path)
    if other is None:
        return "No other checkpoint of this run can be read either: start the run again."
    other_path, step = other
    overrides = path.parent.parent / ".hydra" / "overrides.yaml"
    command = (
        resume_command(OmegaConf.load(overrides), other_path) if overrides.is_file() else f"ckpt_path={other_path}"
    )
    return f"The newest readable checkpoint of this run is {other_path} (step {step}); resume from it: {command}"


# classes that moved since older checkpoints were written: their hyperparameters name them where they were
MOVED_TARGETS = {"shakespeare.muon.MuonAdamW": "shakespeare.training.muon.MuonAdamW"}
TRAINING_DATA_KEYS = (
    "sequence_length",
    "short_context",  # the context schedule (keys an older checkpoint lacks are not compared)
    "short_context_until",
    "batch_size",
    "stride",
    "split",
    "val_fraction",
    "test_fraction",
    "unit",
    "vocab_size",
    "seed",
)


def as_dict(node: DictConfig | None) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str) -> list[str]:
    return [
        f"{prefix}.{key}={wanted.get(key)!r} (the checkpoint has {saved.get(key)!r})"
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
    ]


def resume_command(overrides: list[str], ckpt_path: str | Path) -> str:
    """The command line that resumes a run: its overrides (any old ckpt_path dropped) and the checkpoint."""
    kept = [unescaped(o) for o in overrides if not o.split("=", 1)[0].lstrip("+~") == "ckpt_path"]
    return shlex.join(["python", "train.py", *kept, f"ckpt_path={ckpt_path}"])


def check_resumable(checkpoint: dict[str, Any], path: Path, cfg: DictConfig, tokenizer: Tokenizer) -> None:
    """Refuse to resume a checkpoint under a config it was not trained with, or one with nothing left to do."""
    hparams, data = checkpoint["hyper_parameters"], checkpoint.get("datamodule_hyper_parameters", {})
    optimizer = dict(hparams.get("optimizer", {}))
    if optimizer.get("_target_") in MOVED_TARGETS:
        optimizer["_target_"] = MOVED_TARGETS[optimizer["_target_"]]
    wanted_data = as_dict(cfg.data)
    changed = [
        *differences({**GeneratorConfig.defaults(), **hparams.get("model", {})}, as_dict(cfg.model), "model"),
        *differences(optimizer, as_dict(cfg.optimizer), "optimizer"),
        *differences(hparams.get("scheduler") or {}, as_dict(cfg.get("scheduler")), "scheduler"),
        *differences(
            {k: data[k] for k in TRAINING_DATA_KEYS if k in data},
            {k: wanted_data.get(k) for k in TRAINING_DATA_KEYS if k in data},
            "data",
        ),
    ]
    if not changed and hparams.get("vocabulary") != tokenizer.vocabulary:
        changed.append("the corpus (its characters differ from the ones the checkpoint was trained on)")
    elif not changed and hparams.get("tokenizer") != tokenizer.definition:
        changed.append("the tokenizer (its BPE differs from the one the checkpoint was trained with)")
    if changed:
        run = path.parent.parent
        overrides = run / ".hydra" / "overrides.yaml"
        hint = "Pass the settings it was trained with"
        if path.parent.name == "checkpoints" and overrides.is_file():
            hint = f"Resume it with the overrides it was trained with: {resume_command(OmegaConf.load(overrides), run)}"
        raise UsageError(
            f"ckpt_path: {str(path)!r} was trained with a different configuration, so it cannot resume this one: "
            f"{'; '.join(changed)}. {hint}."
        )
    done = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    if cfg.trainer.max_epochs not in (None, -1) and done >= cfg.trainer.max_epochs:
        raise UsageError(
            f"ckpt_path: {str(path)!r} already trained its {done} epochs (trainer.max_epochs={cfg.trainer.max_epochs}), "
            f"so there is nothing to resume. To train it longer, raise trainer.max_epochs, e.g. "
            f"trainer.max_epochs={done * 2}."
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps not in (None, -1) and checkpoint["global_step"] >= max_steps:
        raise UsageError(
            f"ckpt_path: {str(path)!r} already trained its {checkpoint['global_step']} steps "
            f"(trainer.max_steps={max_steps}), so there is nothing to resume. To train it longer, raise "
            f"trainer.max_steps, e.g. trainer.max_steps={max_steps * 2}."
        )
    budget = budget_seconds(cfg.trainer.get("max_time"))
    spent = checkpoint.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train")
    if budget is not None and spent is not None and spent >= budget:
        raise UsageError(
            f"ckpt_path: {str(path)!r} already trained for its {spent:.0f} s of trainer.max_time "
            f"({cfg.trainer.max_time}), so there is nothing to resume. To train it longer, raise trainer.max_time, "
            f"e.g. trainer.max_time={{seconds:{int(spent) * 2}}}."
        )
    stopped = [s["stopped_epoch"] for k, s in checkpoint.get("callbacks", {}).items() if k.startswith("EarlyStopping")]
    if stopped and stopped[0]:
        raise UsageError(
            f"ckpt_path: {str(path)!r} was stopped early at epoch {stopped[0]} (val/loss had stopped improving), "
            "so there is nothing to resume; its best.ckpt holds the best weights."
        )
