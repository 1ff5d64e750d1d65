"""Learning-rate schedules by name, as torch.optim.lr_scheduler objects stepped once per batch.

    step      lr, then lr/10 from 50% and lr/100 from 75% of the steps (the paper's)
    cosine    cosine from lr to 0
    onecycle  linear warm-up from lr/25 over the first 15% (in whole steps), then cosine to 0
    constant  lr throughout (for weight averaging)
"""

from __future__ import annotations

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

SCHEDULES = ("step", "cosine", "onecycle", "constant")
WARMUP_FRACTION = 0.15  # onecycle
WARMUP_START = 1 / 25  # onecycle: the warm-up starts at lr/25


def build_scheduler(optimizer: Optimizer, schedule: str, total_steps: int) -> LRScheduler:
    total_steps = max(1, total_steps)
    if schedule == "step":
        milestones = [math.ceil(total_steps * 0.5), math.ceil(total_steps * 0.75)]
        return MultiStepLR(optimizer, milestones, gamma=0.1)
    if schedule == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    if schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "onecycle":
        warmup = max(1, round(total_steps * WARMUP_FRACTION))  # whole steps
        return SequentialLR(optimizer, [
            LinearLR(optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warmup),
            CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup)),
        ], milestones=[warmup])
    raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def fast_forward(scheduler: LRScheduler, steps: int) -> None:
    """Advance a fresh `scheduler` by `steps` steps without training (to rebuild its state).

    Call it before loading the optimiser's state: the steps set the optimiser's
    learning rate, which that state then overwrites with the same value.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            scheduler.step()
