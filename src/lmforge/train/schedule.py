"""Learning-rate schedules as plain functions of the step, so resuming needs nothing but the step.

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
