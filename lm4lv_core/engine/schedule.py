"""Learning-rate schedules (``--lr-schedule``), as multipliers of the peak ``--lr``.

``lr_lambda(...)(s)`` is the factor for the optimizer step taken after ``s`` scheduler steps (the
``torch.optim.lr_scheduler.LambdaLR`` convention), so step ``k`` (1-based) trains with ``f(k - 1)``.
Both engines (DeepSpeed and accelerate) and every task (``train``, ``ft-mae``) use the same one.

``reference`` (default)
    DeepSpeed's ``WarmupDecayLR`` as the reference configures it (``warmup_min_lr`` 0,
    ``warmup_max_lr`` = ``--lr``, ``warmup_type`` log), reproduced exactly, including its first
    step: the warmup lasts ``W = max(10, int(warmup_ratio · T))`` steps (``T``: all optimizer steps
    of the run); after ``i`` scheduler steps the factor is ``log(i) / log(W)`` while ``i ≤ W``
    (so the first two steps train at 0), then ``(T - i + 1) / (T - W)`` decaying linearly to 0.
``cosine``
    Linear warmup over ``round(warmup_ratio · T)`` steps (factor ``(s + 1) / W``), then a half
    cosine from 1 down to 0 at step ``T``.
``constant``
    The same linear warmup, then the peak rate until the end (``--warmup-ratio 0``: flat).
"""

from __future__ import annotations

import math
from typing import Callable

from ..errors import ConfigError

SCHEDULES = ("reference", "cosine", "constant")


def warmup_steps_for(schedule: str, total_steps: int, warmup_ratio: float) -> int:
    """Warmup length: ``max(10, int(ratio · T))`` for ``reference`` (the reference's rule),
    ``round(ratio · T)`` otherwise."""
    if schedule == "reference":
        return max(10, int(total_steps * warmup_ratio))
    return int(round(warmup_ratio * total_steps))


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The multiplier of ``--lr`` after ``s`` scheduler steps (see the module docstring)."""
    if schedule == "reference":
        return _warmup_decay(total_steps, warmup_steps)
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    cosine = schedule == "cosine"

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """``deepspeed.runtime.lr_schedules.WarmupDecayLR`` (log warmup from 0): its scheduler starts
    at iteration -1 (rate ``warmup_min_lr`` = 0) and ``step()`` advances it once per optimizer step."""
    warmup = max(2, warmup_steps)
    inv_log = 1.0 / math.log(warmup)

    def f(step: int) -> float:
        it = step - 1  # DeepSpeed's last_batch_iteration
        if it < 0:
            return 0.0
        if it < warmup:
            return inv_log * math.log(it + 1)
        return max(0.0, float(total_steps - it) / float(max(1.0, total_steps - warmup)))

    return f
