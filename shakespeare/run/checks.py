"""The composed config, checked once before anything is built: each mistake gets a message naming the key.

The classes the config builds check their own arguments (GeneratorConfig the model's sizes and dropout,
ShakespeareDataModule the data's sizes and the corpus); this adds what none of them sees.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import fields
from functools import cache
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, OmegaConf

from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.errors import UsageError
from shakespeare.model.generator import SWITCHED_ON_BY, GeneratorConfig
from shakespeare.model.memory import check_memory
from shakespeare.ranges import ABOVE_0, AT_LEAST_0, AT_LEAST_1, FRACTION, Range, WholeOrFraction, ranges_of
from shakespeare.run.calibration import EqualTime
from shakespeare.run.composition import CONFIG_DIR, LADDER, MODEL_BASE, nearest
from shakespeare.run.faults import LostRankWatch
from shakespeare.run.folders import run_overrides
from shakespeare.run.host import set_threads
from shakespeare.run.schema import check_types, parameters
from shakespeare.training.lines import budget_seconds
from shakespeare.training.module import warmup_cosine

# The keys no class or function of the run is built from, and those that mean more here than in the class
# they configure; every other key is typed by the parameters of what its node builds (schema.py).
TYPES = {
    "seed": int,
    "ckpt_path": str | None,  # last, a run folder or a .ckpt
    "checkpoint.every_n_steps": int,
    "paths.log_dir": str,
    "paths.output_dir": str,
    "paths.cache_dir": str,
    "host.threads": parameters(set_threads).types["threads"],  # torch's threads: a count, auto or null
    "host.collective_timeout": float,  # seconds (callbacks.lost_rank applies it)
    "callbacks.early_stopping.patience": int | None,  # null switches early stopping off
}
BUILDERS = {"model": GeneratorConfig, "scheduler": warmup_cosine, "equal_time": EqualTime}  # nodes without a _target_
# The meaningful values of the keys that classes the project does not own (Lightning's, torch's) take, and of
# the keys nothing builds from; every other key's range is the annotation of the parameter it fills.
NO_LIMIT = ((-1, "no limit"),)
RANGES = {
    "seed": Range(0, 2**32, high_open=True, means="the seeds NumPy's generator takes"),
    "checkpoint.every_n_steps": Range(
        1, means="last.ckpt is rewritten this often: a crash loses at most that many steps"
    ),
    "host.threads": ranges_of(set_threads)["threads"][0],
    "host.collective_timeout": ranges_of(LostRankWatch)["collective_timeout"][0],
    "trainer.max_epochs": Range(1, also=NO_LIMIT),
    "trainer.max_steps": Range(1, also=NO_LIMIT),
    "trainer.devices": Range(1, also=((-1, "every device"),)),
    "trainer.num_nodes": AT_LEAST_1,
    "trainer.gradient_clip_val": AT_LEAST_0,
    "trainer.val_check_interval": WholeOrFraction(AT_LEAST_1, Range(0, 1, low_open=True)),
    "trainer.check_val_every_n_epoch": AT_LEAST_1,  # Lightning divides by it
    "trainer.log_every_n_steps": AT_LEAST_1,
    "trainer.limit_train_batches": WholeOrFraction(AT_LEAST_1, Range(0, 1, low_open=True)),
    "trainer.limit_val_batches": WholeOrFraction(AT_LEAST_0, FRACTION),  # 0: no validation
    "optimizer.lr": ABOVE_0,
    "optimizer.weight_decay": AT_LEAST_0,
    "callbacks.model_checkpoint.save_top_k": Range(-1),  # -1: every checkpoint
    "callbacks.last_checkpoint.save_top_k": Range(-1),
    "callbacks.last_checkpoint.every_n_train_steps": AT_LEAST_0,
    "callbacks.early_stopping.patience": Range(1, means="epochs without improvement before stopping; null: never"),
    "callbacks.early_stopping.min_delta": Range(0, means="the drop in val/loss that counts as an improvement"),
}


ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


def check_accelerator(name: str) -> None:
    """Refuse an accelerator this machine lacks before Lightning does it with a traceback."""
    available = [a for a in ("cpu", "cuda", "mps") if AcceleratorRegistry.get(a).is_available()]
    wanted = {"gpu": ["cuda", "mps"]}.get(name, [name])
    if name not in ACCELERATORS:
        raise UsageError(
            f"trainer.accelerator={name!r} is not an accelerator; choose one of {', '.join(ACCELERATORS)}."
        )
    if name != "auto" and not set(wanted) & set(available):
        raise UsageError(
            f"trainer.accelerator={name} is not available on this machine; available here: "
            f"{', '.join(available)}. Use trainer.accelerator={available[-1]} (or auto, which picks the best one)."
        )


def check_config(cfg: DictConfig) -> None:
    """Raise UsageError for the first bad value in `cfg`."""
    known = {f.name for f in fields(GeneratorConfig)} - {"vocab_size"}
    if unknown := sorted(set(cfg.model) - known):
        guess = nearest(unknown[0], sorted(known))
        raise UsageError(
            f"model.{unknown[0]} is not a model setting{f' (did you mean model.{guess}?)' if guess else ''}: the model "
            f"takes {', '.join(sorted(known))}. Remove +model.{unknown[0]} or fix its spelling."
        )
    check_types(cfg, TYPES, RANGES, BUILDERS)  # every key's type and range
    check_rung_settings(cfg.model, run_overrides())
    check_optimizer(cfg.optimizer)
    budget_seconds(cfg.trainer.get("max_time"))
    if cfg.equal_time.budget is not None:
        budget_seconds(cfg.equal_time.budget, "equal_time.budget")
        if cfg.trainer.get("max_time") is not None:
            raise UsageError(
                f"equal_time.budget={cfg.equal_time.budget} and trainer.max_time={cfg.trainer.max_time} are two budgets: "
                "the equal-time mode trains the steps its budget buys. Drop one (trainer.max_time=null)."
            )
    check_early_stopping((cfg.get("callbacks") or {}).get("early_stopping"))


@cache
def rungs() -> dict[str, GeneratorConfig]:
    """Every rung in conf/model/, in ladder order (each extends the one before)."""
    hydra = GlobalHydra.instance()
    with nullcontext() if hydra.is_initialized() else initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        names = [
            name for name in GlobalHydra.instance().config_loader().get_group_options("model") if name != MODEL_BASE
        ]
        with warnings.catch_warnings():  # a group's file composed on its own: Hydra asks for _self_ in it
            warnings.simplefilter("ignore", UserWarning)
            models = {name: OmegaConf.to_container(compose(f"model/{name}").model) for name in names}
    built = {name: GeneratorConfig(vocab_size=2, **{**model, "sequence_length": 1}) for name, model in models.items()}
    return dict(sorted(built.items(), key=lambda item: ladder_position(item[0])))


def ladder_position(rung: str) -> int:
    """How many rungs `rung` extends, following the defaults of conf/model/<rung>.yaml: its place on the ladder."""
    defaults = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{rung}.yaml").get("defaults") or []
    extends = [entry for entry in defaults if isinstance(entry, str) and entry not in ("_self_", MODEL_BASE)]
    return 1 + ladder_position(extends[0]) if extends else 0


def rung_choice(rung: str) -> tuple[str, Path]:
    """The override that picks a rung of the LADDER (`model=head`, `experiment=scale_up`, `rung=muon`) and its file."""
    group = next(
        group for group in ("model", "experiment", "rung") if (Path(CONFIG_DIR) / group / f"{rung}.yaml").is_file()
    )
    return f"{group}={rung}", Path(CONFIG_DIR) / group / f"{rung}.yaml"


def described(path: Path) -> str:
    """What a config adds: its first comment line (Hydra's `# @package` aside)."""
    lines = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("#") and "@package" not in line
    ]
    return lines[0].lstrip("# ") if lines else ""


def group_help() -> str:
    """The config groups and their options for `python train.py --help` (conf/<group>/<option>.yaml; the model
    group's base, and Hydra's own groups, are not choices)."""
    groups = sorted(path for path in Path(CONFIG_DIR).iterdir() if path.is_dir() and path.name != "hydra")
    return "\n".join(
        f"{group.name}: {', '.join(sorted(option.stem for option in group.glob('*.yaml')))}" for group in groups
    )


def rung_help() -> str:
    """The ladder for `python train.py --help`: each rung's number, the override that picks it, what it adds."""
    return "\n".join(
        f"  {n:>2}  {rung_choice(rung)[0]:<28}{described(rung_choice(rung)[1])}" for n, rung in enumerate(LADDER, 1)
    )


def check_rung_settings(model: DictConfig, overrides: list[str]) -> None:
    """Refuse a model key set on the command line that the chosen rung never reads (`model.num_heads` on
    the bigram would train the same model under another name), naming the rungs that read it."""
    settings = OmegaConf.to_container(model, resolve=True)
    unused = GeneratorConfig(vocab_size=2, **settings).unused()
    for key in (override.split("=", 1)[0].lstrip("+~") for override in overrides):
        if key.startswith("model.") and (name := key.removeprefix("model.")) in unused:
            readers = [rung for rung, rung_model in rungs().items() if name not in rung_model.unused()]
            if not readers:
                raise UsageError(
                    f"{key}={settings[name]!r} does nothing on the {settings['name']} rung: only a model with the part "
                    f"that {SWITCHED_ON_BY[name]} switches on reads {name}. Add that setting, or drop {key}."
                )
            raise UsageError(
                f"{key}={settings[name]!r} does nothing on the {settings['name']} rung: its model has no part that "
                f"reads {name}, so this run would train the same model as without it. The rungs that read it: "
                f"{', '.join(readers)}. Pick one of them (e.g. model={readers[-1]} {key}={settings[name]}) or "
                f"drop {key}."
            )


def check_with_data(cfg: DictConfig, datamodule: ShakespeareDataModule) -> None:
    """The checks that need the text: a training step that cannot fit in the memory free for it is refused
    with the estimate and the fix, and a validation interval longer than an epoch with the epoch's length."""
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    model = GeneratorConfig(vocab_size=len(datamodule.tokenizer.vocabulary), **settings)
    batch_size = min(cfg.data.batch_size, len(datamodule.train_windows))  # a text shorter than a batch: one batch
    devices, accelerator = cfg.trainer.devices, cfg.trainer.accelerator
    processes = devices if accelerator == "cpu" and isinstance(devices, int) else 1
    check_memory(model, batch_size, processes, accelerator, asked=cfg.data.batch_size)
    interval, limit = cfg.trainer.get("val_check_interval"), cfg.trainer.get("limit_train_batches")
    batches = math.ceil(len(datamodule.train_windows) / batch_size)
    batches = (
        min(batches, limit) if isinstance(limit, int) else int(batches * limit) if isinstance(limit, float) else batches
    )
    if isinstance(interval, int) and cfg.trainer.get("check_val_every_n_epoch") is not None and interval > batches:
        raise UsageError(
            f"trainer.val_check_interval={interval} is more steps than an epoch has ({batches} batches of "
            f"data.batch_size={cfg.data.batch_size}), so validation would never run. Use at most {batches}, a "
            "fraction of an epoch (e.g. 0.25), or trainer.check_val_every_n_epoch=null to count the steps across epochs."
        )


def check_optimizer(optimizer: DictConfig) -> None:
    """Settings the optimizer accepts (it is built once on a dummy parameter, and checks its own)."""
    try:
        instantiate(optimizer, params=[torch.zeros(1, requires_grad=True)])
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise UsageError(
            f"The optimizer ({optimizer.get('_target_')}) refuses its settings: {cause}. Check the optimizer.* "
            "values (`python train.py --cfg job` prints them)."
        ) from None


def check_early_stopping(conf: DictConfig | None) -> None:
    """`patience` switches early stopping on; `min_delta` only means something alongside it."""
    if conf is not None and conf.get("patience") is None and conf.get("min_delta"):
        raise UsageError(
            f"callbacks.early_stopping.min_delta={conf.min_delta} is set but patience is null, so early "
            "stopping is off. Set callbacks.early_stopping.patience (epochs without improvement) too."
        )
