"""Open a run's checkpoint safely: it alone rebuilds the model and its tokenizer, no corpus or config needed.

Only torch is needed (not Lightning), so the generate command starts quickly.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from shakespeare.errors import UsageError
from shakespeare.model import GeneratorConfig, ShakespeareGenerator
from shakespeare.run_folder import newest_run
from shakespeare.tokenizer import Tokenizer, tokenizer_for

BEST = Path("checkpoints") / "best.ckpt"
EXAMPLE = "outputs/<date>/<time>_<rung>/checkpoints/best.ckpt"
PREFIX = "model."  # ShakespeareModule keeps the generator as `self.model`


def resolve_checkpoint(path: str | Path, log_dir: str | Path = "outputs") -> Path:
    """A checkpoint file as given, a run folder's `checkpoints/best.ckpt`, or for `last` the best.ckpt of the
    newest run under `log_dir`."""
    if str(path) == "last":
        run = newest_run(log_dir, BEST.name)
        if run is None:
            raise UsageError(
                f"ckpt_path=last found no run to write with: no {Path(log_dir) / '<date>/<time>_<rung>'}/{BEST}. "
                f"Train one first (python train.py), or pass a run folder or a checkpoint such as {EXAMPLE}."
            )
        return run / BEST
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / BEST).is_file():
            return path / BEST
        raise UsageError(
            f"ckpt_path={str(path)!r} is a folder without {BEST}. Pass a run folder written by train.py "
            f"(outputs/<date>/<time>_<rung>) or a checkpoint file such as {EXAMPLE}."
        )
    if not path.is_file():
        raise UsageError(
            f"ckpt_path={str(path)!r} does not exist. Pass a checkpoint file such as {EXAMPLE}, or a run folder."
        )
    return path


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint's contents, read with PyTorch's safe `weights_only` loading."""
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"ckpt_path={str(path)!r} is not a PyTorch checkpoint: it is truncated or another kind of file "
            f"(checkpoints are zip archives). Pass a complete checkpoint written by train.py, such as {EXAMPLE}."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        raise UsageError(
            f"ckpt_path={str(path)!r} holds Python objects{f' ({refused[1]})' if refused else ''} that PyTorch's "
            "safe weights_only loading refuses, so it is not a checkpoint written by train.py, whose "
            f"hyperparameters are plain data. Pass a checkpoint such as {EXAMPLE}."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError):
        raise UsageError(
            f"ckpt_path={str(path)!r} is not a readable PyTorch checkpoint: it is damaged or truncated. Pass a "
            f"complete checkpoint written by train.py, such as {EXAMPLE}."
        ) from None


def load_generator(
    path: str | Path, map_location: str | torch.device = "cpu", log_dir: str | Path = "outputs"
) -> tuple[ShakespeareGenerator, Tokenizer]:
    """The trained model (in eval mode) and tokenizer of a checkpoint, a run folder, or `last` (the newest run)."""
    path = resolve_checkpoint(path, log_dir)
    checkpoint = read_checkpoint(path, map_location)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not {"vocabulary", "model"} <= hparams.keys() or "state_dict" not in checkpoint:
        raise UsageError(
            f"ckpt_path={str(path)!r} is a PyTorch file but not a checkpoint of this project: it lacks the "
            f"model weights or the hyperparameters (vocabulary and model config) that rebuild the model. Pass a "
            f"checkpoint written by train.py, such as {EXAMPLE}."
        )
    state = {k.removeprefix(PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    try:
        tokenizer = tokenizer_for(hparams["vocabulary"])  # a byte-level model's vocabulary is the 256 bytes
        model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(tokenizer), **hparams["model"]))
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UsageError(
            f"ckpt_path={str(path)!r} has weights that do not fit the model its hyperparameters describe "
            f"({str(err).splitlines()[0][:200]}). The file was altered or written by another version; "
            "retrain or pass another checkpoint."
        ) from None
    return model.to(map_location).eval(), tokenizer
