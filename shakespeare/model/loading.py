"""Open a run's checkpoint safely: it alone rebuilds the model and its tokenizer, no corpus or config needed.

Only torch is needed (not Lightning), so the generate command starts quickly.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.tokenizer import Tokenizer, TokenizerError, tokenizer_for

BEST = Path("checkpoints") / "best.ckpt"
EXAMPLE = "outputs/<date>/<time>_<rung>/checkpoints/best.ckpt"
PREFIX = "model."  # ShakespeareModule keeps the generator as `self.model`


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's `checkpoints/best.ckpt`."""
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


class Unreadable(ValueError):
    """Why a file is not a checkpoint this project can read, as the end of a sentence: `it is cut short ...`."""


def load_verified(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """A checkpoint's contents, read with PyTorch's safe `weights_only` loading after checking its zip records'
    checksums, which torch.load does not do: a flipped bit in the weights would otherwise load as a wrong number.
    Raises Unreadable saying what is wrong with the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        raise Unreadable(
            "it is cut short or not a PyTorch checkpoint at all (checkpoints are complete zip archives)"
        ) from None
    if damaged is not None:
        raise Unreadable(f"its contents are damaged (the checksum of {damaged} does not match: bit rot or a bad copy)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        raise Unreadable(
            f"it holds Python objects{f' ({refused[1]})' if refused else ''} that PyTorch's safe weights_only loading "
            "refuses, so it is not a checkpoint written by train.py, whose hyperparameters are plain data"
        ) from None
    except Exception as err:  # a zip of other files, or records torch cannot read
        raise Unreadable(
            f"torch cannot read its records: it is damaged or truncated, or not a checkpoint written by "
            f"train.py ({type(err).__name__})"
        ) from None


def load_generator(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ShakespeareGenerator, Tokenizer]:
    """The trained model (in eval mode) and tokenizer of a checkpoint or a run folder (its best.ckpt)."""
    path = resolve_checkpoint(path)
    try:
        checkpoint = load_verified(path, map_location)
    except Unreadable as err:
        raise UsageError(
            f"ckpt_path={str(path)!r} cannot be read: {err}. Pass a complete checkpoint written by "
            f"train.py, such as {EXAMPLE}."
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not {"vocabulary", "model"} <= hparams.keys() or "state_dict" not in checkpoint:
        raise UsageError(
            f"ckpt_path={str(path)!r} is a PyTorch file but not a checkpoint of this project: it lacks the "
            f"model weights or the hyperparameters (vocabulary and model config) that rebuild the model. Pass a "
            f"checkpoint written by train.py, such as {EXAMPLE}."
        )
    state = {k.removeprefix(PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    tokenizer = checkpoint_tokenizer(hparams, path)
    try:
        model = ShakespeareGenerator(GeneratorConfig(vocab_size=len(tokenizer), **hparams["model"]))
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UsageError(
            f"ckpt_path={str(path)!r} has weights that do not fit the model its hyperparameters describe "
            f"({str(err).splitlines()[0][:200]}). The file was altered or written by another version; "
            "retrain or pass another checkpoint."
        ) from None
    return model.to(map_location).eval(), tokenizer


def checkpoint_tokenizer(hparams: dict, path: Path) -> Tokenizer:
    """The tokenizer a checkpoint's hyperparameters keep: its vocabulary (characters, or the 256 bytes), and for a
    BPE its definition (`tokenizer`, the JSON Hugging Face's tokenizers writes), refused when missing or damaged."""
    try:
        return tokenizer_for(hparams["vocabulary"], hparams.get("tokenizer"))
    except (ValueError, TypeError, AttributeError) as err:  # TokenizerError is a ValueError
        reason = (
            str(err) if isinstance(err, TokenizerError) else "its vocabulary is damaged (it is not a list of tokens)"
        )
        raise UsageError(
            f"ckpt_path={str(path)!r} cannot be read: {reason}, so the ids its model writes cannot be turned into "
            f"text. The file was altered or damaged; retrain, or pass another checkpoint, such as {EXAMPLE}."
        ) from None
