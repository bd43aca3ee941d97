"""Learning-rate schedules as LambdaLR multipliers, stepped once per optimiser step.

`inverse_sqrt` is sam3's own `InverseSquareRootParamScheduler` (Meta's recipe: warmup, lr / sqrt(step /
timescale), linear cooldown); `cosine` and `constant` follow a linear warmup.
"""

from __future__ import annotations

import math
from functools import partial

from sam3.train.optim.schedulers import InverseSquareRootParamScheduler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "inverse_sqrt", "constant")


def _warmup_then(step: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _inverse_sqrt(step: int, scheduler: InverseSquareRootParamScheduler, total: int) -> float:
    # sam3's scheduler is called with (step, fraction of training done); base_lr=1 makes it a multiplier.
    # Step + 1 so the first optimiser step does not run at lr 0.
    return max(0.0, scheduler(step + 1, (step + 1) / total))


def build_scheduler(optimizer: Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                    cooldown_steps: int = 0, min_lr_ratio: float = 0.0, timescale: int = 20) -> LambdaLR:
    """Warmup then cosine / constant, or sam3's inverse-sqrt with cooldown.

    Raises:
        ValueError: an unknown schedule name.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"module.schedule={schedule!r}: choose one of {SCHEDULES}")
    total = max(1, total_steps)
    if schedule == "inverse_sqrt":
        scheduler = InverseSquareRootParamScheduler(1.0, warmup_steps, cooldown_steps, timescale)
        return LambdaLR(optimizer, partial(_inverse_sqrt, scheduler=scheduler, total=total))
    return LambdaLR(optimizer, partial(_warmup_then, schedule=schedule, warmup=warmup_steps, total=total,
                                       min_ratio=min_lr_ratio))
