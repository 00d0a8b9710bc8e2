"""`python -m shakespeare.report FOLDER`: one markdown table and a validation-curve plot over every run in a folder,
with every run's sample.

Runs are read from what every run folder has, its TensorBoard events and `.hydra/` record, so the report
works on sweeps, on single runs and on runs that crashed part way (listed as such).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shakespeare.errors import UsageError
from shakespeare.report.figures import labels, plot_validation_curves, write_figures
from shakespeare.report.meaning import meaning_section
from shakespeare.report.runs import load_runs
from shakespeare.report.samples import samples_section
from shakespeare.report.seeds import seeds_section
from shakespeare.report.tables import budget_table, markdown_table, units_table


def write_report(
    folder: str | Path, out: str | Path | None = None, prompt: str = "", seed: int = 0, sample_length: int = 300
) -> tuple[str, Path, Path]:
    """Write report.md (the table, the plot, every run's sample) and val_curves.png into `out` (default:
    `folder`); returns (table, report, plot). `sample_length=0` leaves the samples out."""
    runs = load_runs(folder)
    out = Path(out or folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    if units := units_table(runs):  # losses per token of different tokens do not compare: bits per character do
        table += f"\nThe same time budget each (trainer.max_time), by tokens, on the whole held-out text:\n\n{units}"
    elif budgets := budget_table(runs, labels(runs)):
        table += (
            "\nThe same time budget each (trainer.max_time, or equal_time.budget's steps), losses on the whole "
            f"held-out text:\n\n{budgets}"
        )
    if seeds := seeds_section(runs, labels(runs)):
        table += f"\n{seeds}"
    if meaning := meaning_section(runs, labels(runs)):
        table += f"\n{meaning}"
    plot = plot_validation_curves(runs, out / "val_curves.png")
    samples = "\n" + samples_section(runs, prompt, seed, sample_length) if sample_length else ""
    report = out / "report.md"
    report.write_text(
        f"# Runs in {Path(folder).name}\n\n{table}\n![validation loss per epoch]({plot.name})\n{samples}",
        encoding="utf-8",
    )
    return table, report, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shakespeare.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of runs: outputs/, a sweep's folder, or one run's folder")
    parser.add_argument("--out", help="where to write report.md and val_curves.png (default: the folder)")
    parser.add_argument("--prompt", default="", help="the prompt every run's sample continues (default: empty)")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed (default: 0)")
    parser.add_argument(
        "--sample-length", type=int, default=300, help="tokens per sample (characters for char runs); 0: no samples"
    )
    parser.add_argument("--figures", metavar="DIR", help="also write attention.png and loss_by_position.png into DIR")
    args = parser.parse_args(argv)
    if args.sample_length < 0:
        print(f"Error: --sample-length={args.sample_length} must be 0 (no samples) or more, e.g. 300.", file=sys.stderr)
        return 2
    prompt = args.prompt.replace("\\n", "\n")  # a typed \n is a line break, as in generate.py
    try:
        table, report, plot = write_report(args.folder, args.out, prompt, args.seed, args.sample_length)
        figures = write_figures(load_runs(args.folder), Path(args.figures)) if args.figures else []
    except UsageError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"Wrote {report} and {plot}")
    for figure in figures:
        print(f"Wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
