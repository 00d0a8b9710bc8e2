"""How much of a run's budget is spent: the fraction the learning rate's and the context's schedules follow.

A budget is trainer.max_steps (or max_epochs x batches per epoch), trainer.max_time, or both; whichever ends
first ends the run, so the fraction spent is the larger of the two.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Timer


def budget_timer(callbacks: list) -> Timer | None:
    """Lightning's own Timer when it holds a trainer.max_time budget (it always exists, usually unlimited)."""
    timer = next((c for c in callbacks if isinstance(c, Timer)), None)
    return timer if timer is not None and timer.time_remaining() is not None else None


def time_spent(timer: Timer | None) -> float:
    """The fraction of trainer.max_time used, by Lightning's own Timer: the clock that stops the run, counting
    validation and checkpointing as it does, and the earlier sessions of a resumed run. 0 without a budget."""
    if timer is None:
        return 0.0
    elapsed, remaining = timer.time_elapsed(), timer.time_remaining()
    return min(1.0, elapsed / max(elapsed + remaining, 1e-9))


def budget_spent(step: int, total_steps: float, timer: Timer | None) -> float:
    """The fraction of the budget spent at `step` of `total_steps` (inf: no step budget), or of `timer`'s time."""
    steps = step / total_steps if math.isfinite(total_steps) and total_steps > 0 else 0.0
    return max(0.0, min(1.0, max(steps, time_spent(timer))))
