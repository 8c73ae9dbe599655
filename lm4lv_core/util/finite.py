"""Non-finite numbers (NaN, ±inf): in option values, refused at the start, and in tensors of
weights, which are never written to a checkpoint nor loaded into a model."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from ..errors import ConfigError


def require_finite(owner: Any, names: Iterable[str], label: str = "--{}") -> None:
    """A one-line ``ConfigError`` for the first attribute of ``owner`` among ``names`` that is a
    number but not finite (``label`` formats the option name, ``_`` shown as ``-``)."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise ConfigError(f"{label.format(name.replace('_', '-'))} must be a finite number, got {value}")


def nonfinite_names(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating tensors in ``tensors`` holding a NaN or an infinity."""
    import torch

    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def nonfinite_in_file(path) -> list[str]:
    """Names of the floating tensors of a safetensors file holding a NaN or an infinity (read one
    tensor at a time)."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad.append(k)
    return bad
