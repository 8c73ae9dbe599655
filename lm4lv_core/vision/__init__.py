"""Vision parts: encoders, decoders and adapters, built by name from the registries."""

from __future__ import annotations

import inspect

import torch

from ..config import ModuleSpec
from ..registry import ADAPTERS, DECODERS, ENCODERS
from . import adapters, mae  # noqa: F401  (registers the built-in parts)
from .base import VisionDecoder, VisionEncoder


def _build(cls, kwargs: dict, dtype: torch.dtype | None):
    """``cls(**kwargs)`` with its weights in ``dtype``: read in it directly when the constructor
    takes a ``dtype``, else cast after building."""
    if dtype is not None and "dtype" in inspect.signature(cls).parameters:
        return cls(**kwargs, dtype=dtype)
    part = cls(**kwargs)
    return part.to(dtype) if dtype is not None else part


def build_encoder(spec: ModuleSpec, dtype: torch.dtype | None = None) -> VisionEncoder:
    return _build(ENCODERS.get(spec.name), spec.kwargs, dtype)


def build_decoder(spec: ModuleSpec, dtype: torch.dtype | None = None) -> VisionDecoder:
    return _build(DECODERS.get(spec.name), spec.kwargs, dtype)


def build_adapter(spec: ModuleSpec, in_dim: int, out_dim: int):
    return ADAPTERS.get(spec.name)(in_dim=in_dim, out_dim=out_dim, **spec.kwargs)


__all__ = ["VisionEncoder", "VisionDecoder", "build_encoder", "build_decoder", "build_adapter"]
