"""Where the configs live, and what Hydra refuses while composing one, said as one paragraph with the fix: a key
that is not there (with the nearest that is), an option a group lacks, an override it cannot read.

Hydra's own message for a misspelt key suggests `+key=...`, which would add the typo as a key nothing reads,
and exits 1 after a multi-line report; these exit 2, as every other refused input does.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from shakespeare.model.generator import GeneratorConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # shakespeare/run/ -> the checkout
MODEL_BASE = "defaults"  # conf/model/'s base, which every rung extends: GeneratorConfig's defaults (the bigram's)

# The ladder, in order: the research log's seven rungs and its scale-up, then the modern rungs. Each is a
# model config (model=<rung>, extending the one before), an experiment (scale_up) or a rung config (muon, ngram).
LADDER = [
    "bigram",
    "head",
    "multihead",
    "multihead_ffn",
    "block",
    "block_norm",
    "block_norm_dropout",
    "scale_up",
    "rmsnorm",
    "rope",
    "relu2",
    "qk_norm",
    "muon",
    "ngram",
]


def register_model_base() -> None:
    """Every model setting at its GeneratorConfig default, as the config node `model/defaults` that conf/model/'s
    rungs extend, so each rung's file names only what it changes and the defaults live in one place."""
    settings = GeneratorConfig.defaults()
    ConfigStore.instance().store(
        group="model", name=MODEL_BASE, node={**settings, "sequence_length": "${data.sequence_length}"}
    )


register_model_base()
OmegaConf.register_new_resolver("documented", lambda name: documented(name), use_cache=True, replace=True)  # --help
MOVED = {"trainer.threads": "host.threads", "trainer.collective_timeout": "host.collective_timeout"}


def documented(config_name: str) -> str:
    """conf/<config_name>.yaml's own keys as the file writes them, each with its comment (for `--help`: Hydra's
    $CONFIG drops the comments); its defaults list and its `hydra:` section left out."""
    kept, skipping = [], False
    for line in (Path(CONFIG_DIR) / f"{config_name}.yaml").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith((" ", "#")):
            skipping = line.startswith(("defaults:", "hydra:"))
        if not skipping and (kept or line and not line.startswith("#")):  # the file's header comment aside
            kept.append(line)
    return "\n".join(kept).strip("\n")


def keys(node: object, prefix: str = "") -> Iterator[str]:
    """Every key under `node`, nodes and leaves, as dotted paths."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            yield from keys(value, f"{prefix}{key}.")


def known_keys(config_name: str) -> list[str]:
    """The keys of the config `config_name` composed as it stands (Hydra's own `hydra` node aside)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name)
    return [key for key in keys(OmegaConf.to_container(cfg, resolve=False)) if not key.startswith("hydra")]


def nearest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key(key: str, config_name: str, script: str) -> str:
    if key in MOVED:
        return f"{key} is now {MOVED[key]}: write {MOVED[key]}=... instead (it is this process's setting, not the Trainer's)."
    try:
        guess = nearest(key, known_keys(config_name))
    except Exception:  # the config cannot be composed even without the overrides: no guess
        guess = None
    mean = f" Did you mean {guess}?" if guess else ""
    return (
        f"{key} is not a setting of {script}.{mean} `python {script} --cfg job` lists every key (+{key}=... would "
        "add it as a new key that nothing reads)."
    )


def explain(err: Exception, config_name: str, script: str) -> str:
    """One paragraph for an error Hydra raised while composing `config_name`."""
    if isinstance(err, OverrideParseException):
        return (
            f"{err.override!r} is not an override {script} can read ({err.message.splitlines()[0]}). Write "
            "key=value, and quote a value with spaces or special characters, e.g. 'prompt=\"ROMEO: hi\"'."
        )
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, option = err.missing_cfg_file.rsplit("/", 1)
        guess = nearest(option, err.options)
        mean = f" Did you mean {group}={guess}?" if guess else ""
        return f"{group}={option} is not an option of {group}: choose one of {', '.join(err.options)}.{mean}"
    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return unknown_key(cause.full_key, config_name, script)
    return " ".join(
        line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("Config search path")
    )


@contextmanager
def explained_composition(config_name: str, script: str) -> Iterator[None]:
    """Around a `hydra.main` entry point: Hydra raises what it cannot compose (HYDRA_FULL_ERROR) instead of
    printing its own report, and this says it in one paragraph and exits 2."""
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (OverrideParseException, ConfigCompositionException) as err:
        print(f"Error: {explain(err, config_name, script)}", file=sys.stderr, flush=True)
        sys.exit(2)
