"""Learning-rate schedules as plain functions of the step, so resuming needs nothing but the step; and
`TimeBudget`, which fits the schedule's length to a wall-clock budget.

    cosine  linear warmup, then half a cosine from the peak down to the floor (Loshchilov & Hutter
            2017, SGDR; the GPT-3 / LLaMA recipe)
    linear  linear warmup, then a straight line down to the floor
    wsd     warmup-stable-decay: warmup, a long constant phase, then a linear decay to the floor over
            the last `decay_fraction` of the steps (Hu et al. 2024, MiniCPM, arXiv 2404.06395; Hägele
            et al. 2024, arXiv 2405.18392): a run can be extended from any checkpoint of the stable phase.

Step s (0-based) of a run of `total` steps; the warmup reaches the peak at step `warmup - 1`, and
the decay reaches the floor at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return peak
        progress = (step - decay_start + 1) / max(1, total - decay_start)
        return peak + (floor - peak) * min(1.0, progress)
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    if schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak + (floor - peak) * progress
    raise ValueError(f"optim.schedule: unknown schedule '{schedule}' (cosine, linear, wsd)")


class TimeBudget:
    """How many steps a wall-clock budget (`train.max_minutes`) holds, so that the schedule's warmup and
    decay end when the budget does (a time-based run, as in the speedrun trainers, without knowing the
    step time in advance).

    The step time is measured, not assumed. The first step of a run is left out (it pays for compilation
    and the allocator's warm-up); from `FIT_AFTER` steps after it, after every step the schedule's length
    is fitted again to: the steps done + the steps that the time left holds at the mean wall time per step
    since then (validations and checkpoints included, so they are paid for too), keeping back the time of
    one validation (the last one measured) for the final one; at most `max_steps`. As the budget runs out
    the length closes in on the current step, so the learning rate reaches its floor as the budget ends;
    the final validation and checkpoint follow. The budget counts the training time of every run of a
    resumed training (`spent`, which the checkpoints record), so a resumed run gets what is left. A budget
    run is not reproducible step for step: its length depends on the machine's speed.
    """

    FIT_AFTER = 5

    def __init__(self, minutes: float, max_steps: int, spent: Callable[[], float], clock: Callable[[], float]):
        """spent(): the training seconds so far, of this run and the runs it resumed; clock(): seconds."""
        self.seconds, self.max_steps, self.spent, self.clock = minutes * 60, max_steps, spent, clock
        self.mark: tuple[int, float] | None = None  # (step, time) at the end of this run's first step
        self.reserve = 0.0  # seconds kept back for the final validation
        self.total = max_steps
        self.fitted = False

    def update(self, step: int) -> int:
        """After `step` steps: the number of steps to plan for (`step` itself once the time is up)."""
        now = self.clock()
        if self.mark is None:
            self.mark = (step, now)
        elif step - self.mark[0] >= self.FIT_AFTER:
            per_step = (now - self.mark[1]) / (step - self.mark[0])
            left = self.seconds - self.spent() - self.reserve
            self.total = min(self.max_steps, step + max(0, math.floor(left / max(per_step, 1e-9))))
            self.fitted = True
        if self.spent() >= self.seconds:
            self.total = step
        return self.total
