"""What a new user meets first: the README's two commands, CI running the same, `--help` naming the command."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.harness import ROOT, compose_train


def readme_block(heading: str) -> str:
    """The first ```bash block after the README line starting with `heading`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"```bash\n(.+?)\n```", text[text.index(heading) :], re.S).group(1).strip()


def test_the_quick_start_installs_what_training_needs_and_ci_runs_the_readmes_test_command():
    train = readme_block("## Quick start")
    assert re.fullmatch(
        r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install torch==2\.13\.0 -e \. && python train\.py",
        train,
    )
    tests = readme_block("Run the tests")
    install = re.fullmatch(
        r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install (.+) && pytest", tests
    ).group(1)
    assert install == 'torch==2.13.0 -e ".[dev,scale]"'  # the test tools, and the launchers the scaling tests use
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"\npip install -q {install}\n" in ci and ci.rstrip().endswith("\npytest")


def test_help_names_the_command_and_every_rung_with_what_it_adds(tmp_path):
    text = compose_train(tmp_path).hydra.help.template
    assert text.startswith("python train.py [group=option ...] [key=value ...]\n") and "powered by Hydra" not in text
    for rung in (ROOT / "conf" / "model").glob("*.yaml"):
        adds = rung.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        assert re.search(rf"^ +\d+  model={rung.stem} +{re.escape(adds)}$", text, re.M), rung.stem
    ladder = text.split("== The ladder")[1].split("== Configuration groups")[0]
    assert not re.search(r"[;,:]$", ladder, re.M)  # no description cut mid-sentence


def test_the_readme_numbers_the_ladder_as_help_does(tmp_path):
    from shakespeare.run.checks import rung_help

    helped = re.findall(r"^ +(\d+)  (\S+)", rung_help(), re.M)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \|", readme, re.M)
    assert [(n, choice if "=" in choice else f"model={choice}") for n, choice in rows] == helped


def test_the_readmes_epoch_lines_are_the_ones_a_run_prints():
    from shakespeare.training.lines import epoch_line

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"^(?:\d+/\d+|step) .*?Train loss.*$", readme, re.M)
    assert shown
    for line in shown:
        where, seconds, train, val, best = re.fullmatch(
            r"(.+?) -- ([\d.]+)s \tTrain loss \t([\d.]+)(?: \tEval loss \t([\d.]+))?( \t<<)?", line
        ).groups()
        assert line == epoch_line(where, float(seconds), float(train), val and float(val), bool(best))
    assert not re.search(r"`\d+/\d+ -- [\d.]+s  Train loss", readme)  # no space-separated variants


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, first, groups",
    [
        ("train.py", "python train.py [group=option ...]", "\nmodel: bigram, block"),  # Hydra filled in the groups
        ("generate.py", "python generate.py ckpt_path=<run folder or .ckpt>", "\nmax_new_tokens: 500"),
    ],
)
def test_help_of_both_commands(script, first, groups, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.startswith(first), result.stdout[:500] + result.stderr[-2000:]
    assert groups in result.stdout and "powered by Hydra" not in result.stdout


def test_the_ladder_lists_every_rung_each_after_the_one_it_extends():
    from shakespeare.run.checks import ladder_position
    from shakespeare.run.composition import LADDER

    models = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))
    assert sorted(set(LADDER) & set(models)) == models  # every model config is a rung of it
    in_order = [rung for rung in LADDER if rung in models]
    assert [ladder_position(rung) for rung in in_order] == list(range(len(in_order)))
