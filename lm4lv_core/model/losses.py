"""Losses computed outside the LLM: text cross-entropy (vision losses: :mod:`lm4lv_core.vision.losses`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
