"""Interfaces every vision encoder / decoder implements."""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] → features ``[B, num_tokens, dim]``."""

    dim: int
    num_tokens: int
    image_size: int

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class VisionDecoder(nn.Module):
    """Features ``[B, num_tokens, dim]`` → images ``[B, 3, H, W]`` in [0, 1]."""

    dim: int
    num_tokens: int
    image_size: int

    def forward(self, features: torch.Tensor, clamp: bool = True) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
