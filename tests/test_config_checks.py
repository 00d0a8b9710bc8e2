"""Nothing confusing: every bad config value, file or checkpoint stops the run before training with a message
naming the key, the value and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, OverrideParseException

from shakespeare.cli.train import fit
from shakespeare.errors import UsageError
from shakespeare.run.checks import check_config
from shakespeare.run.composition import explain
from shakespeare.run.folders import discard_refused_run
from tests.harness import ROOT, compose_train, fast_first, run_train, write_corpus


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=multihead", "model.num_heads=5"], r"model.num_heads=5 does not divide model.embedding_size=32"),
        (["model=head", "model.embedding_size=0"], r"model.embedding_size=0 must be a whole number of at least 1"),
        (["model=block_norm_dropout", "model.dropout=1.0"], r"model.dropout=1.0 must be a number in \[0, 1\)"),
        (["model=block_norm_dropout", "model.dropout=-0.1"], r"model.dropout=-0.1 must be a number in \[0, 1\)"),
        (["optimizer.lr=0"], r"optimizer.lr=0 must be a number above 0"),
        (["optimizer.lr=-0.001"], r"optimizer.lr=-0.001 must be a number above 0"),
        (["+optimizer.betas=[1.5,0.9]"], r"The optimizer \(torch.optim.Adam\) refuses its settings: .*beta"),
        (["data.batch_size=0"], r"data.batch_size=0 must be a whole number of at least 1"),
        (["data.sequence_length=3000"], r"data.sequence_length=3000 is too long for .*validation split holds 2000"),
        (["+model.head_size=4"], r"model.head_size is not a model setting.*: the model takes activation, attention, "),
        (["+model.num_head=8"], r"model.num_head is not a model setting \(did you mean model.num_heads\?\)"),
        (["+data.batchsize=8"], r"data.batchsize is not a setting of .*DataModule. Did you mean data.batch_size\?"),
        (["trainer.max_epochs=0"], r"trainer.max_epochs=0 must be a whole number of at least 1"),
        (["trainer.max_steps=0"], r"trainer.max_steps=0 must be a whole number of at least 1, or -1 \(no limit\)"),
        (
            ["trainer.precision=13"],
            r"trainer.precision=13 is refused: trainer.precision \(a parameter of lightning.pytorch.Trainer\) "
            r"takes 64, 32, 16, .*bf16-mixed",
        ),
        (
            ["data.batch_size=abc"],
            r"data.batch_size='abc' is refused: data.batch_size \(a parameter of "
            r"shakespeare.data.datamodule.ShakespeareDataModule\) takes a whole number, e.g. data.batch_size=1024.",
        ),
        (["model=multihead", "model.num_heads=4.5"], r"model.num_heads=4.5 is refused: .* takes a whole number"),
        (["trainer.max_epochs=ten"], r"trainer.max_epochs='ten' is refused: .* takes a whole number or null"),
        (["+trainer.max_epoch=3"], r"trainer.max_epoch is not a setting of lightning.pytorch.Trainer"),
        (["trainer.accelerator=1"], r"trainer.accelerator=1 is refused: .* takes text.*quote text"),
        (["seed=-5"], r"seed=-5 must be a whole number in \[0, 4294967296\) \(the seeds NumPy's generator takes\)"),
        (["trainer.log_every_n_steps=0"], r"trainer.log_every_n_steps=0 must be a whole number of at least 1"),
        (
            ["trainer.check_val_every_n_epoch=0"],
            r"trainer.check_val_every_n_epoch=0 must be a whole number of at least 1",
        ),
        (
            ["trainer.val_check_interval=100"],
            r"trainer.val_check_interval=100 is more steps than an epoch has \(5 batches",
        ),
        (["host.threads=two"], r"host.threads='two' is refused: host.threads takes auto, a whole number or null"),
        (
            ["model=block_norm_dropout", "model.embedding_size=300000"],
            r"This run needs about .* GiB for one training step "
            r"\(.*\), but only .* is available in RAM. The model alone does not fit: lower model.embedding_size",
        ),
        (["data.split=halves"], r"data.split='halves' is refused: .* takes one of contiguous, random_windows"),
        (["checkpoint.every_n_steps=0"], r"checkpoint.every_n_steps=0 must be a whole number of at least 1"),
        (["callbacks.early_stopping.min_delta=0.01"], r"min_delta=0.01 is set but patience is null"),
        (["callbacks.early_stopping.patience=0"], r"callbacks.early_stopping.patience=0 must be a whole number"),
        (
            ["callbacks.early_stopping.patience=3", "callbacks.early_stopping.min_delta=-1"],
            r"min_delta=-1 must be a number of at least 0 \(the drop in val/loss",
        ),
    ],
)
@pytest.mark.slow
def test_bad_config_values_are_named_before_training(overrides, message, tiny_cfg):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(UsageError, match=message):
        fit(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # nothing started


@pytest.mark.parametrize(
    "override, message",
    fast_first(
        [
            ("model=transformer", r"^model=transformer is not an option of model: choose one of bigram, .*, rope\.$"),
            ("model=multihed", r"^model=multihed is not an option of model: .* Did you mean model=multihead\?$"),
            (
                "model.num_head=8",
                r"^model.num_head is not a setting of train.py. Did you mean model.num_heads\? .*--cfg job",
            ),
            ("modle=bigram", r"^modle is not a setting of train.py. Did you mean model\?"),
            ("trainer.threads=2", r"^trainer.threads is now host.threads: write host.threads=... instead"),
            (
                "callbacks=early_stopping",
                r"^callbacks=early_stopping is not an option of callbacks: choose one of default.",
            ),
            ("seed=1=2", r"^'seed=1=2' is not an override train.py can read \(mismatched input '='"),
        ],
        keep=3,
    ),
)
def test_what_hydra_cannot_compose_is_one_paragraph_with_the_fix(override, message, tmp_path):
    with pytest.raises((ConfigCompositionException, OverrideParseException)) as err:
        compose_train(tmp_path, [override])
    assert re.search(message, explain(err.value, "train", "train.py")), explain(err.value, "train", "train.py")


@pytest.mark.slow
def test_a_misspelt_key_exits_2_with_the_nearest_key(tmp_path):
    result = run_train(["model.num_head=8"], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "Error: model.num_head is not a setting of train.py. Did you mean model.num_heads? "
        "`python train.py --cfg job` lists every key (+model.num_head=... would add it as a new key "
        "that nothing reads).\n"
    )


def train_once(tiny_cfg, *overrides: str) -> Path:
    cfg = tiny_cfg(*overrides)
    fit(cfg)
    return Path(cfg.paths.output_dir)


def test_resuming_under_another_config_names_the_differences(tiny_cfg):
    run = train_once(tiny_cfg, "model=multihead", "trainer.max_epochs=1")
    with pytest.raises(
        UsageError,
        match=r"different configuration.*model.num_heads=8 \(the checkpoint has 4\); "
        r"data.batch_size=64 \(the checkpoint has 32\); data.short_context=4 \(the checkpoint has None\)",
    ):
        changed = ["model.num_heads=8", "data.batch_size=64", "data.short_context=4"]
        fit(tiny_cfg("model=multihead", "trainer.max_epochs=2", *changed, f"ckpt_path={run}"))


@pytest.mark.slow
def test_resuming_a_finished_run_says_how_to_train_longer(tiny_cfg):
    run = train_once(tiny_cfg, "trainer.max_epochs=1")
    with pytest.raises(UsageError, match=r"already trained its 1 epochs.*trainer.max_epochs=2"):
        fit(tiny_cfg("trainer.max_epochs=1", f"ckpt_path={run}"))
    with pytest.raises(UsageError, match=r"already trained its 5 steps \(trainer.max_steps=5\).*trainer.max_steps=10"):
        fit(tiny_cfg("trainer.max_epochs=-1", "trainer.max_steps=5", f"ckpt_path={run}"))
    fit(tiny_cfg("trainer.max_epochs=2", f"ckpt_path={run}"))  # and raising max_epochs does it


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"ckpt_path='.*missing.ckpt' does not exist"),
        (
            b"not a checkpoint",
            r"cannot be resumed: it is cut short or not a PyTorch checkpoint at all \(checkpoints are complete zip archives\)",
        ),
    ],
)
def test_bad_checkpoint_files_are_named(content, message, tiny_cfg, tmp_path):
    path = tmp_path / "missing.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        fit(tiny_cfg(f"ckpt_path={path}"))


def test_ckpt_path_last_without_runs_says_what_it_looked_for(tiny_cfg, tmp_path):
    with pytest.raises(UsageError, match="ckpt_path=last found no run to resume"):
        fit(tiny_cfg("ckpt_path=last", f"paths.log_dir={tmp_path / 'nothing'}"))


@pytest.mark.slow
def test_bad_data_through_the_cli_is_one_paragraph_and_exit_2(tmp_path):
    # (missing, empty, binary and too-short files: tests/test_data.py; this checks what the command shows)
    path = tmp_path / "latin1.txt"
    path.write_bytes("ROMEO: caf\xe9\n".encode("latin-1"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"data.path={path}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    [line] = [line for line in out.splitlines() if "[ERROR]" in line]
    assert f"data.path={str(path)!r} is not UTF-8 text (byte 10 cannot be decoded)" in line
    assert "Traceback" not in out


def test_the_default_rung_has_heads_and_the_bigram_is_one_override_away(tmp_path):
    assert compose_train(tmp_path).model.name == "block_norm_dropout"
    assert compose_train(tmp_path, ["model=bigram"]).model.attention == "none"


@pytest.mark.parametrize(
    "overrides, message",
    fast_first(
        [
            (
                ["model=bigram", "model.num_heads=8"],
                r"model.num_heads=8 does nothing on the bigram rung: .* The rungs that "
                r"read it: multihead, multihead_ffn, block, block_norm, block_norm_dropout, rmsnorm, rope, relu2, qk_norm. Pick "
                r"one of them \(e.g. model=qk_norm model.num_heads=8\) or drop model.num_heads.",
            ),
            (
                ["model=qk_norm", "model.ngram_buckets=4096"],
                r"model.ngram_buckets=4096 does nothing on the qk_norm rung: only a model with the part that "
                r"model.ngrams=2 or more \(rung=ngram\) switches on reads ngram_buckets",
            ),
            (
                ["model=head", "model.num_blocks=2"],
                r"model.num_blocks=2 does nothing on the head rung: .* read it: block, ",
            ),
            (
                ["model=multihead_ffn", "model.layer_norm=true"],
                r"model.layer_norm=True does nothing on the multihead_ffn rung",
            ),
            (
                ["model=bigram", "model.dropout=0.1"],
                r"model.dropout=0.1 does nothing on the bigram rung: .* read it: head, ",
            ),
        ],
        keep=2,
    ),
)
def test_a_setting_the_rung_never_reads_is_refused_naming_the_rungs_that_do(overrides, message, tiny_cfg):
    with pytest.raises(UsageError, match=message):
        check_config(tiny_cfg(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=block_norm", "model.dropout=0.1"],  # switches dropout on: the next rung
        ["model=bigram", "model.attention=multihead", "model.num_heads=2"],  # a bigram made multi-head reads its heads
        ["model=multihead", "model.num_heads=8"],
        ["model=qk_norm", "model.ngrams=3", "model.ngram_buckets=4096"],  # n-gram tables read it
    ],
)
def test_settings_that_change_the_rung_or_that_it_reads_are_accepted(overrides, tiny_cfg):
    check_config(tiny_cfg(*overrides))


def test_a_refused_run_takes_back_its_new_folder_and_nothing_else(tmp_path):
    log_dir = tmp_path / "outputs"
    new = log_dir / "2026-01-01" / "12-00-00-000000_bigram"  # what Hydra made for the refused run
    (new / ".hydra").mkdir(parents=True)
    (new / ".hydra" / "config.yaml").write_text("{}")
    (new / "train.log").write_text("[ERROR] - ...")
    resumed = log_dir / "2026-01-02" / "09-00-00-000000_block"  # a run an attempt to resume added a record to
    (resumed / ".hydra" / "resumed-2026-01-03_10-00-00").mkdir(parents=True)
    (resumed / ".hydra" / "config.yaml").write_text("{}")
    (resumed / "checkpoints").mkdir()
    discard_refused_run(new, ".hydra", log_dir)
    assert not (log_dir / "2026-01-01").exists() and log_dir.is_dir()  # the empty date folder goes too
    discard_refused_run(resumed, ".hydra/resumed-2026-01-03_10-00-00", log_dir)
    assert sorted(p.name for p in resumed.rglob("*")) == [".hydra", "checkpoints", "config.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=bigram", "model.num_heads=8"], "model.num_heads=8 does nothing on the bigram rung"),
        (
            ["model=block_norm_dropout", "model.embedding_size=300000"],
            "The model alone does not fit",
        ),  # not the OOM killer
    ],
)
def test_a_refused_run_says_why_in_one_paragraph_and_leaves_no_folder(overrides, message, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"data.path={corpus}", *overrides],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    [line] = [line for line in out.splitlines() if "[ERROR]" in line]
    assert message in line and "Traceback" not in out
    assert list(tmp_path.iterdir()) == [corpus]  # no run folder for the report to list or ckpt_path=last to step over


def group_options() -> list[tuple[str, str]]:
    """Every (group, option) `python train.py --help` offers, but Hydra's own."""
    conf = ROOT / "conf"
    return [
        (str(path.parent.relative_to(conf)), path.stem)
        for path in sorted(conf.glob("*/*.yaml"))
        if path.parent.name != "hydra"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("group, option", group_options())
def test_every_option_a_group_offers_composes_a_whole_run(group, option, tmp_path):
    """An option is a whole (a rung, a trainer), never a part that would replace the rest of its group: with any
    one of them the run still has every callback that prints its lines and keeps its checkpoints."""
    cfg = compose_train(tmp_path, [f"{group}={option}"])
    assert {"model_checkpoint", "last_checkpoint", "epoch_line", "research_log", "progress_bar"} <= set(cfg.callbacks)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and cfg.model.name and cfg.optimizer._target_
