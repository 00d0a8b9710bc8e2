"""research_log.md in every run folder, and what TensorBoard shows for a run (read back through a real server)."""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from shakespeare.cli.train import fit, hyperparameters
from shakespeare.errors import Interrupted
from shakespeare.training.lines import ResearchLog, epoch_line
from shakespeare.training.module import BEST_VAL_LOSS, TRAIN_LOSS
from shakespeare.training.tags import TOKENS_PER_SECOND
from tests.harness import tensorboard


class FailAtEpoch(L.Callback):
    """Raises `error` when epoch `epoch` starts, as a crash or Ctrl+C mid-run would."""

    def __init__(self, epoch: int = 1, error: str = "RuntimeError") -> None:
        self.epoch, self.error = epoch, error

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.epoch:
            errors = {"KeyboardInterrupt": KeyboardInterrupt, "SIGTERMException": SIGTERMException}
            raise errors.get(self.error, lambda: RuntimeError("disk on fire"))()


class MarkInterrupted(L.Callback):
    """Marks the research log interrupted and stops gracefully, as a signal handler would."""

    def on_train_epoch_end(self, trainer, module) -> None:
        next(cb for cb in trainer.callbacks if isinstance(cb, ResearchLog)).mark("interrupted", "SIGTERM")
        trainer.should_stop = True


def failing(epoch: int, error: str) -> list[str]:
    return [
        f"+callbacks.fail._target_={__name__}.FailAtEpoch",
        f"+callbacks.fail.epoch={epoch}",
        f"+callbacks.fail.error={error}",
    ]


@pytest.mark.slow  # trains
def test_research_log_has_the_logs_shape(tiny_cfg):
    cfg = tiny_cfg("model=block_norm", "trainer.max_epochs=2")
    fit(cfg)
    text = (Path(cfg.paths.output_dir) / "research_log.md").read_text()
    assert text.startswith("## block_norm, ") and "\nStatus: finished\n" in text
    assert re.search(
        r"^Config\(batch_size=32, sequence_length=8, embedding_size=32, num_heads=4, .*epochs=2, "
        r"learning_rate=0.001, patience=None, min_delta=None",
        text,
        re.M,
    )
    assert "python train.py " in text and "model=block_norm" in text
    assert "ShakespeareModule(\nmodel=ShakespeareGenerator(\n  (embedding): Embedding(" in text
    assert "(norm1): LayerNorm((32,)" in text and "optimizer=Adam (\nParameter Group 0" in text
    assert text.count("\ncriterion=CrossEntropyLoss())\n") == 1
    lines = re.findall(r"^(\d)/2 -- \d+\.\d\ds \tTrain loss \t\d\.\d{4} \tEval loss \t\d\.\d{4} \t(<<)?$", text, re.M)
    assert [epoch for epoch, _ in lines] == ["0", "1"] and lines[0][1] == "<<"
    assert re.search(r"^Training completed. Elapsed time: \d+\.\d\ds$", text, re.M)
    assert re.search(r"^Parameters: 9,613$", text, re.M)  # block_norm over the test corpus's 45 characters
    assert re.search(r"^Throughput: [\d,]+ tokens/s \(training, mean over 2 epochs\)$", text, re.M)
    sample = re.search(r"Generation:\n```\n---------- Predict from empty input:\n(.+?)\n```", text, re.S)
    assert sample and len(sample.group(1)) >= 300 and "<|pad|>" not in sample.group(1)


def test_epoch_line_is_the_logs():
    line = epoch_line("9/10", 6.5, 2.45291, 2.45419, best=True)
    assert line == "9/10 -- 6.50s \tTrain loss \t2.4529 \tEval loss \t2.4542 \t<<"  # as research-log.md prints it
    assert epoch_line("0/10", 1.0, None, 2.0, best=False).endswith("Eval loss \t2.0000")  # no trailing whitespace


@pytest.mark.slow  # trains a run end to end
def test_a_crashed_run_keeps_a_partial_entry_marked_failed(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=3", *failing(1, "RuntimeError"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        fit(cfg)
    text = (Path(cfg.paths.output_dir) / "research_log.md").read_text()
    assert "Status: failed (RuntimeError: disk on fire)" in text
    assert "0/3 -- " in text and "1/3 -- " not in text and "Training completed" not in text
    assert not list(Path(cfg.paths.output_dir).glob("*.part"))  # written atomically, nothing left behind


@pytest.mark.slow  # trains a run end to end
def test_ctrl_c_marks_the_entry_interrupted(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=3", *failing(1, "KeyboardInterrupt"))
    with pytest.raises(Interrupted):  # Lightning's graceful shutdown on Ctrl+C exits; fit says how to resume
        fit(cfg)
    text = (Path(cfg.paths.output_dir) / "research_log.md").read_text()
    assert "Status: interrupted (Training interrupted by SIGINT. " in text and "Resume with: python train.py" in text


@pytest.mark.slow  # trains a run end to end
def test_sigterm_marks_the_entry_interrupted(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=3", *failing(1, "SIGTERMException"))
    with pytest.raises(Interrupted):
        fit(cfg)
    assert (
        "Status: interrupted (Training interrupted by SIGTERM. "
        in (Path(cfg.paths.output_dir) / "research_log.md").read_text()
    )


@pytest.mark.slow  # trains a run end to end
def test_a_marked_interruption_survives_the_end_of_training(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=3", f"+callbacks.mark._target_={__name__}.MarkInterrupted")
    fit(cfg)
    text = (Path(cfg.paths.output_dir) / "research_log.md").read_text()
    assert "Status: interrupted (SIGTERM)" in text and "Training completed" in text and "1/3 -- " not in text


def test_hyperparameters_are_flat_resolved_and_without_noise(tiny_cfg):
    params = hyperparameters(tiny_cfg("model=multihead", "callbacks.early_stopping.patience=3"))
    assert params["model.name"] == "multihead" and params["model.sequence_length"] == 8  # resolved interpolation
    assert params["data.batch_size"] == 32 and params["optimizer.lr"] == 0.001 and params["trainer.max_epochs"] == 1
    assert params["callbacks.early_stopping.patience"] == 3
    assert not [key for key in params if "_target_" in key or key.startswith(("hydra", "paths", "logger"))]
    assert not [key for key in params if key.endswith(("url", "sha256", "dirpath", "default_root_dir"))]


@pytest.mark.slow  # trains
def test_tensorboard_events_hold_lr_throughput_and_hparams(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=2", "trainer.log_every_n_steps=1")
    fit(cfg)
    events = EventAccumulator(cfg.paths.output_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_step", TRAIN_LOSS, "val/loss", "lr-Adam", TOKENS_PER_SECOND, BEST_VAL_LOSS} <= tags
    assert len(events.Scalars(TOKENS_PER_SECOND)) == 2 and events.Scalars(TOKENS_PER_SECOND)[-1].value > 0
    best = min(e.value for e in events.Scalars("val/loss"))
    assert events.Scalars(BEST_VAL_LOSS)[-1].value == pytest.approx(best)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.name"].string_value == "bigram" and hparams["data.batch_size"].number_value == 32
    assert not [key for key in hparams if "vocabulary" in key or "_target_" in key]


@pytest.mark.slow
def test_tensorboard_server_shows_losses_samples_and_hparams(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=head", "trainer.max_epochs=2", "trainer.log_every_n_steps=1")
    fit(cfg)
    with tensorboard(Path(cfg.paths.output_dir).parent) as get:
        tags = get("/scalars/tags").get("run", {})
        assert {"train/loss_step", TRAIN_LOSS, "val/loss", "lr-Adam", TOKENS_PER_SECOND} <= set(tags)
        query = urllib.parse.urlencode({"run": "run", "tag": "val/loss"})
        losses = get(f"/scalars/scalars?{query}")
        assert len(losses) == 2 and all(0 < value < 10 for _, _, value in losses)

        experiment = get("/hparams/experiment", {"experimentName": ""})
        names = {info["name"] for info in experiment["hparamInfos"]}
        assert {"model.name", "data.batch_size", "optimizer.lr", "trainer.max_epochs"} <= names
        assert not [name for name in names if "_target_" in name or "vocabulary" in name]
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [BEST_VAL_LOSS]
        groups = get(
            "/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                "colParams": [],
                "startIndex": 0,
                "sliceSize": 10,
            },
        )
        [group] = groups["sessionGroups"]
        assert group["hparams"]["model.name"] == "head"
        [metric] = group["metricValues"]
        assert metric["value"] == pytest.approx(min(value for _, _, value in losses), abs=1e-4)

        assert get("/text/tags").get("run") == ["generation/empty_input/text_summary"]
        query = urllib.parse.urlencode({"run": "run", "tag": "generation/empty_input/text_summary"})
        samples = get(f"/text/text?{query}")
        assert len(samples) == 2 and all(len(s["text"]) > 100 for s in samples)  # one sample per epoch
