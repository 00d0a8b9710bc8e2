"""What a new user meets first: the README's two commands, CI running the same, `--help` naming the command."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, compose_train


def readme_block(heading: str) -> str:
    """The first ```bash block after the README line starting with `heading`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"```bash\n(.+?)\n```", text[text.index(heading):], re.S).group(1).strip()


def test_the_quick_start_installs_what_training_needs_and_ci_runs_the_readmes_test_command():
    train = readme_block("## Quick start")
    assert re.fullmatch(r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install torch==2\.13\.0 -e \. && python train\.py", train)
    tests = readme_block("Run the tests")
    install = re.fullmatch(r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install (.+) && pytest", tests).group(1)
    assert install == 'torch==2.13.0 -e ".[dev,scale]"'  # the test tools, and the launchers the scaling tests use
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"\npip install -q {install}\n" in ci and ci.rstrip().endswith("\npytest")


def test_help_names_the_command_and_every_rung_with_what_it_adds(tmp_path):
    text = compose_train(tmp_path).hydra.help.template
    assert text.startswith("python train.py [group=option ...] [key=value ...]\n") and "powered by Hydra" not in text
    for rung in (ROOT / "conf" / "model").glob("*.yaml"):
        adds = rung.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        assert re.search(rf"^  model={rung.stem} +{re.escape(adds)}$", text, re.M), rung.stem


@pytest.mark.slow
@pytest.mark.parametrize("script, first, groups", [
    ("train.py", "python train.py [group=option ...]", "\nmodel: bigram, block"),  # Hydra filled in the groups
    ("generate.py", "python generate.py ckpt_path=<run folder or .ckpt>", "\nmax_new_tokens: 500"),
])
def test_help_of_both_commands(script, first, groups, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(first), result.stdout[:500] + result.stderr[-2000:]
    assert groups in result.stdout and "powered by Hydra" not in result.stdout
