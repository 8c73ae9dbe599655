"""Losses computed outside the LLM: vision losses (registered by name) and text cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import VISION_LOSSES


@VISION_LOSSES.register("feature_mse")
def feature_mse(pred: torch.Tensor, target: torch.Tensor, target_pixels, decoder) -> torch.Tensor:
    """Mean squared error between predicted and encoder features ``[T, N, d_v]`` (the paper's loss)."""
    return F.mse_loss(pred.float(), target.float())


@VISION_LOSSES.register("pixel_l1")
def pixel_l1(pred: torch.Tensor, target: torch.Tensor, target_pixels, decoder) -> torch.Tensor:
    """L1 between the decoded prediction and the target image in [0, 1]."""
    images = decoder(pred, clamp=False)
    return F.l1_loss(images.float(), target_pixels.float())


def text_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over already-shifted, already-selected positions (``[T, V]`` vs ``[T]``)."""
    return F.cross_entropy(logits.float(), labels)


def zero_touching(params) -> torch.Tensor:
    """A zero that depends on ``params``, so every trainable parameter joins the graph.

    Distributed data parallel wrappers expect all trainable parameters to receive a gradient
    each step, even in a batch without image targets (or without text labels).
    """
    total = None
    for p in params:
        if p.requires_grad:
            total = p.sum() * 0.0 if total is None else total + p.sum() * 0.0
    return total if total is not None else torch.zeros(())
