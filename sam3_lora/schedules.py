"""Learning-rate schedules as LambdaLR multipliers, stepped once per optimiser step."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "inverse_sqrt", "constant")


def _multiplier(step: int, schedule: str, warmup: int, total: int, cooldown: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        value = 1.0
    elif schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        value = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    else:  # inverse_sqrt, Meta's recipe: 1/sqrt(steps since warmup), with a linear cooldown at the end
        value = 1.0 / math.sqrt(max(1, step - warmup + 1))
    if schedule == "inverse_sqrt" and cooldown and step >= total - cooldown:
        value *= max(0.0, (total - step) / cooldown)
    return value


def build_scheduler(optimizer: Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                    cooldown_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Warmup then cosine / inverse-sqrt (+ cooldown) / constant.

    Raises:
        ValueError: an unknown schedule name.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"module.schedule={schedule!r}: choose one of {SCHEDULES}")
    lam = partial(_multiplier, schedule=schedule, warmup=warmup_steps, total=max(1, total_steps),
                  cooldown=cooldown_steps, min_ratio=min_lr_ratio)
    return LambdaLR(optimizer, lam)
