"""Every key of the composed configs has its type checked before anything is built, and a step that cannot fit in
memory is refused with the estimate and the fix."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from shakespeare.cli.generate import RANGES as GENERATE_RANGES
from shakespeare.cli.generate import SETTINGS
from shakespeare.errors import UsageError
from shakespeare.model.generator import GeneratorConfig
from shakespeare.model.memory import check_memory, step_memory
from shakespeare.run.checks import BUILDERS, RANGES, TYPES, rungs
from shakespeare.run.composition import CONFIG_DIR
from shakespeare.run.schema import NOT_TAKEN, check_values, conforms, described
from tests.harness import compose_train

# the configs whose keys are checked: the default and the groups that bring keys of their own
VARIANTS = [
    [],
    ["optimizer=muon", "scheduler=warmup_cosine"],
    ["optimizer=adamw"],
    ["trainer=ddp"],
    ["experiment=cpu_speedrun"],
]
# a value of another type than the key's current one
WRONG = {bool: "maybe", int: {"not": "a number"}, float: "much", str: [1, 2], type(None): [[1]], list: 5, dict: 5}


def plain_train_config(overrides: list[str]) -> dict:
    cfg = compose_train("/nonexistent/run", overrides)
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def plain_generate_config() -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose("generate"), resolve=True)


def keys(node: dict, prefix: str = "") -> list[str]:
    """Every leaf key under `node`; the values of a built node's keys (optimizer.adamw) are leaves too."""
    found = []
    for key, value in node.items():
        if isinstance(value, dict) and value and (key != "adamw"):
            found += keys(value, f"{prefix}{key}.")
        elif key != "_target_":
            found.append(f"{prefix}{key}")
    return found


CONFIGS = {" ".join(v) or "default": plain_train_config(v) for v in VARIANTS}
CONFIGS["generate.py"] = plain_generate_config()
CASES = list({key: (name, key) for name, values in reversed(CONFIGS.items()) for key in keys(values)}.values())


def get(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def put(values: dict, key: str, value) -> dict:
    values = copy.deepcopy(values)
    *path, last = key.split(".")
    node = values
    for part in path:
        node = node[part]
    node[last] = value
    return values


def check(name: str, values: dict) -> None:
    if name == "generate.py":
        check_values(values, SETTINGS, GENERATE_RANGES)
    else:
        check_values(values, TYPES, RANGES, BUILDERS)


def test_every_composed_key_has_a_type_and_the_composed_values_fit_it():
    assert len(CASES) > 100
    for name, values in CONFIGS.items():
        check(name, values)


@pytest.mark.parametrize("name, key", CASES)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(name, key):
    values = CONFIGS[name]
    wrong = WRONG[type(get(values, key))]
    with pytest.raises(UsageError, match=rf"^{re.escape(f'{key}={wrong!r}')} is refused: {re.escape(key)} .*takes "):
        check(name, put(values, key, wrong))


def test_a_key_nothing_takes_is_refused_naming_what_it_was_given_to():
    values = CONFIGS["default"]
    with pytest.raises(
        UsageError, match=r"^data.batchsize is not a setting of shakespeare.data.datamodule.ShakespeareDataModule"
    ):
        check("default", put(values, "data.batchsize", 32))
    with pytest.raises(UsageError, match=r"^checkpoint.every is not a setting of this project"):
        check("default", put(values, "checkpoint.every", 32))


def test_a_step_too_big_for_memory_is_refused_with_the_estimate_and_the_batch_that_fits():
    model = GeneratorConfig(
        vocab_size=66,
        sequence_length=64,
        name="scale_up",
        attention="multihead",
        embedding_size=64,
        num_heads=8,
        feed_forward=True,
        residual=True,
        layer_norm=True,
        dropout=0.1,
    )  # the scale-up
    with pytest.raises(
        UsageError, match=r"needs about [\d.]+ (TiB|GiB) .* Lower data.batch_size to at most ([\d,]+)"
    ) as err:
        check_memory(model, batch_size=100_000_000)
    fits = int(err.value.args[0].split("at most ")[1].split(" ")[0].replace(",", ""))
    check_memory(model, batch_size=fits // 2)  # (the memory other processes leave free moves a little)
    with pytest.raises(UsageError):
        check_memory(model, batch_size=2 * fits)
    with pytest.raises(UsageError, match=r"one training step each, for 4 processes"):
        check_memory(model, batch_size=fits // 2, processes=4)  # four DDP processes share the machine
    assert step_memory(model, 1024).total < step_memory(model, 2048).total  # it grows with the batch


def test_a_model_whose_ngram_tables_cannot_fit_is_refused_naming_the_tables_settings():
    model = dataclasses.replace(rungs()["qk_norm"], vocab_size=66, sequence_length=8, ngrams=5, ngram_buckets=10**9)
    with pytest.raises(UsageError, match=r"The model alone does not fit: lower model.ngram_buckets, model.ngrams, "):
        check_memory(model, batch_size=1)  # five tables of up to 10^9 rows: terabytes of parameters
    with pytest.raises(UsageError, match=r"alone does not fit: lower model.embedding_size, model.num_blocks or "):
        check_memory(dataclasses.replace(model, ngrams=1, embedding_size=300_000), batch_size=1)  # no tables: not named


def test_every_rung_has_an_estimate():
    for name, rung in rungs().items():
        memory = step_memory(dataclasses.replace(rung, vocab_size=66, sequence_length=8), batch_size=64)
        assert memory.activations > 0 and memory.logits == 3 * 64 * 8 * 66 * 4, name


def test_a_time_budget_in_fractional_seconds_is_refused_saying_whole_numbers():
    values = put(CONFIGS["default"], "trainer.max_time", {"seconds": 26.5})
    with pytest.raises(
        UsageError,
        match=r"trainer.max_time=\{'seconds': 26.5\} .* takes text, a mapping of keys to whole numbers or null",
    ):
        check("default", values)


def test_a_builder_that_takes_any_keyword_takes_any_value():
    def callback(every: int = 1, **options: Any) -> None:  # a user's callback that passes its options on
        """A builder whose extra keywords are typed Any."""

    check_values(
        {"callbacks": {"mine": {"every": 2, "colour": "red", "sizes": [1, 2]}}}, {}, {}, {"callbacks.mine": callback}
    )
    with pytest.raises(UsageError, match=r"^callbacks.mine.every='2' is refused"):
        check_values({"callbacks": {"mine": {"every": "2"}}}, {}, {}, {"callbacks.mine": callback})


def numeric_leaves() -> list[tuple[str, str]]:
    """(config, key) for every key of the composed configs that takes a number (not only a choice among a few)."""
    found = {}
    for name, values in reversed(CONFIGS.items()):
        table, ranges, builders = (
            (SETTINGS, GENERATE_RANGES, {}) if name == "generate.py" else (TYPES, RANGES, BUILDERS)
        )
        for leaf in described(values, table, ranges, builders):
            counts = conforms(12345, leaf.kind) or conforms(0.123, leaf.kind)
            if leaf.kind not in (None, NOT_TAKEN) and counts and (leaf.rule or not conforms("any text", leaf.kind)):
                found[leaf.key] = (name, leaf.key)  # (text keys read a number as text: prompt=1234)
    return sorted(found.values())


@pytest.mark.parametrize("name, key", numeric_leaves())
def test_every_number_has_a_range_and_a_meaningless_one_is_refused_naming_the_key(name, key):
    table, ranges, builders = (SETTINGS, GENERATE_RANGES, {}) if name == "generate.py" else (TYPES, RANGES, BUILDERS)
    [leaf] = [leaf for leaf in described(CONFIGS[name], table, ranges, builders) if leaf.key == key]
    assert leaf.rule is not None, f"{key} takes a number but says of none that it is meaningless: declare its Range"
    bad = leaf.rule.outside()
    bad = int(bad) if leaf.whole and float(bad).is_integer() else bad
    with pytest.raises(UsageError, match=rf"^{re.escape(f'{key}={bad!r}')} must be (a|a whole|a finite) number"):
        check(name, put(CONFIGS[name], key, bad))
