"""The report's pictures: validation curves, loss by position, and the README's attention grid."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from shakespeare.errors import UsageError
from shakespeare.report.runs import Run, steps_done
from shakespeare.report.seeds import strip_seed


def labels(runs: list[Run]) -> list[str]:
    """Short names for plot legends: the rung and the overrides that differ between the runs; runs that would
    still share a name (a sweep over data.path, repeats) add their folder's."""
    common = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    names = [" ".join([run.rung, *(o for o in run.overrides if o not in common)]) for run in runs]
    return [f"{name} ({run.name})" if names.count(name) > 1 else name for name, run in zip(names, runs)]


def curve_tag(runs: list[Run]) -> str:
    """What the validation curves show: the loss, or bits per character where the runs' tokens differ (losses per
    token of different tokens do not compare)."""
    return "val/bpc" if len({run.tokens for run in runs}) > 1 else "val/loss"


def validation_curves(runs: list[Run]) -> tuple[str, list[tuple[str, list[int], list[float]]]]:
    """Each run's validation losses (bits per character where the runs' tokens differ) against the epoch, or
    against the training step once any run validates every so many steps (a time or step budget): the x axis's
    name, and (label, x, y) per run that has any."""
    axis = "epoch" if all(run.by_epoch for run in runs) else "step"
    points, tag = [], curve_tag(runs)
    for run, label in zip(runs, labels(runs)):
        events = run.scalars.get(tag, [])
        if events:
            x = [steps_done(step) for step, _, _ in events] if axis == "step" else list(range(len(events)))
            points.append((label, x, [value for _, _, value in events]))
    return axis, points


def plot_by_configuration(ax, curves: list[tuple[str, list, list[float]]]) -> None:
    """One line per (label, x, y) curve: a configuration's seeds share a colour and one legend entry, so that a
    sweep over seeds reads by configuration."""
    seeds = Counter(strip_seed(label) for label, _, _ in curves)
    colours: dict[str, str] = {}
    for label, x, y in curves:
        name = strip_seed(label)
        first = name not in colours
        colours.setdefault(name, f"C{len(colours) % 10}")
        shown = (f"{name} ({seeds[name]} seeds)" if seeds[name] > 1 else label) if first else "_nolegend_"
        ax.plot(x, y, marker="o", markersize=3, color=colours[name], label=shown)
    if len(colours) > 1:
        ax.legend(fontsize="small")


def plot_loss_by_position(ax, curves: list[tuple[str, list[float]]]) -> None:
    """Loss against the position in the window (the context a prediction sees), one line per curve."""
    from matplotlib.ticker import MaxNLocator

    plot_by_configuration(ax, [(label, list(range(1, len(values) + 1)), values) for label, values in curves])
    ax.set(xlabel="position in the window (tokens of context)", ylabel="eval loss", title="Validation loss by position")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_validation_curves(runs: list[Run], path: Path) -> Path:
    """A PNG of validation loss per epoch, one line per run (a configuration's seeds in one colour, named once in
    the legend); beside it, when the runs logged it, the validation loss by position in the window (from each
    run's best epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [(label, run.loss_by_position) for run, label in zip(runs, labels(runs)) if run.loss_by_position]
    if curves:
        fig, (ax, by_position) = plt.subplots(1, 2, figsize=(15, 5.5))
        plot_loss_by_position(by_position, curves)
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5))
    axis, points = validation_curves(runs)
    plot_by_configuration(ax, points)
    title = "Validation loss by training step" if axis == "step" else "Validation loss per epoch"
    ax.set(xlabel=axis, ylabel="eval bits per character" if curve_tag(runs) == "val/bpc" else "eval loss", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(runs: list[Run], folder: Path) -> list[Path]:
    """`loss_by_position.png` over every run that logged it, and `attention.png`: the last attention grid of
    the highest rung that logged one. The README's pictures come from here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--figures {str(folder)!r} is a file; pass a folder to write the pictures into, e.g. docs.")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    curves = [(label, run.loss_by_position) for run, label in zip(runs, labels(runs)) if run.loss_by_position]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        plot_loss_by_position(ax, curves)
        fig.tight_layout()
        fig.savefig(folder / "loss_by_position.png", dpi=100)
        plt.close(fig)
        written.append(folder / "loss_by_position.png")
    grid = next((grid for run in reversed(runs) if (grid := run.attention_grid())), None)
    if grid:
        (folder / "attention.png").write_bytes(grid)
        written.append(folder / "attention.png")
    return written
