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

A run resumed with another length (``--max-steps`` / ``--epochs``) keeps its schedule up to the
checkpoint and continues from the rate it had there, without a jump: :func:`chained_lambda` over
the run's *segments* ``[(0, T0), (s1, T1), ...]`` (segment ``k`` starts at step ``s_k`` and ends
the run at ``T_k``). From ``s = max(s_k, end of warmup)`` the factor ``m = f_prev(s)`` decays to 0
at ``T_k`` along the schedule's own shape, ``m · (1 − x)`` for ``reference``, ``m · ½(1 + cos πx)``
for ``cosine`` (``x = (step − s) / (T_k − s)``), and stays ``m`` for ``constant``; the warmup keeps
the length of the first segment. A run that is never resumed with another length has one segment.
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


def warmup_end(schedule: str, warmup_steps: int) -> int:
    """The first scheduler step whose factor is the peak (1) after the warmup."""
    return max(2, warmup_steps) + 1 if schedule == "reference" else warmup_steps


def chained_lambda(schedule: str, segments: list[tuple[int, int]], warmup_ratio: float) -> Callable[[int], float]:
    """The factor of a run extended or shortened on resume (see the module docstring);
    ``segments[0]`` is ``(0, T0)``, one segment gives exactly :func:`lr_lambda`."""
    first_total = segments[0][1]
    warmup = warmup_steps_for(schedule, first_total, warmup_ratio)
    f = lr_lambda(schedule, first_total, warmup)
    for start, total in segments[1:]:
        f = _continued(f, schedule, max(start, warmup_end(schedule, warmup)), total)
    return f


def _continued(prev: Callable[[int], float], schedule: str, start: int, total: int) -> Callable[[int], float]:
    peak = prev(start)
    span = max(1, total - start)

    def f(step: int) -> float:
        if step < start:
            return prev(step)
        x = min(1.0, (step - start) / span)
        if schedule == "constant":
            return peak
        if schedule == "cosine":
            return peak * 0.5 * (1.0 + math.cos(math.pi * x))
        return peak * (1.0 - x)

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
