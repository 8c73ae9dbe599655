"""The first parameter of modules that may own none (an identity adapter, a pseudo-inverse
deadapter, an emptied or frozen part): never ``next(module.parameters())``, which raises a bare
``StopIteration`` on a weightless part."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def first_parameter(*parts: nn.Module | torch.Tensor | None, floating: bool = False) -> torch.Tensor | None:
    """The first parameter of the first of ``parts`` that has one (a tensor part is its own
    parameter; ``None`` parts are skipped); ``floating``: floating-point ones only. ``None`` when
    none of them has any."""
    for part in parts:
        if part is None:
            continue
        params: Iterable[torch.Tensor] = (part,) if isinstance(part, torch.Tensor) else part.parameters()
        for p in params:
            if not floating or p.is_floating_point():
                return p
    return None


def parameter_device(*parts: nn.Module | torch.Tensor | None, default: torch.device | str = "cpu") -> torch.device:
    """The device of :func:`first_parameter` of ``parts``, else ``default``."""
    p = first_parameter(*parts)
    return p.device if p is not None else torch.device(default)


def parameter_dtype(*parts: nn.Module | torch.Tensor | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the first floating parameter of ``parts``, else ``default``."""
    p = first_parameter(*parts, floating=True)
    return p.dtype if p is not None else default
