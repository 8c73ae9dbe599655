"""Vision parts: encoders, decoders and adapters, built by name from the registries."""

from __future__ import annotations

from ..config import ModuleSpec
from ..registry import ADAPTERS, DECODERS, ENCODERS
from . import adapters, mae  # noqa: F401  (registers the built-in parts)
from .base import VisionDecoder, VisionEncoder


def build_encoder(spec: ModuleSpec) -> VisionEncoder:
    return ENCODERS.get(spec.name)(**spec.kwargs)


def build_decoder(spec: ModuleSpec) -> VisionDecoder:
    return DECODERS.get(spec.name)(**spec.kwargs)


def build_adapter(spec: ModuleSpec, in_dim: int, out_dim: int):
    return ADAPTERS.get(spec.name)(in_dim=in_dim, out_dim=out_dim, **spec.kwargs)


__all__ = ["VisionEncoder", "VisionDecoder", "build_encoder", "build_decoder", "build_adapter"]
