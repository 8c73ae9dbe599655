"""Vision losses, registered by name. Each declares the token kind it compares and whether it
goes through the vision decoder; the model asks the loss, never its name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import VISION_LOSSES
from .base import CODES, FEATURES


@dataclass(frozen=True)
class VisionLoss:
    """``fn(pred [T, N, head_dim], target tokens [T, N(, d)], target pixels [T, 3, H, W], decoder)``."""

    name: str
    tokens: str            # FEATURES | CODES: the token kind it needs
    uses_decoder: bool     # decodes the prediction to pixels (needs all N tokens and the pixels)
    fn: Callable
    doc: str

    def __call__(self, pred, target, target_pixels, decoder) -> torch.Tensor:
        return self.fn(pred, target, target_pixels, decoder)


def _register(name: str, tokens: str, uses_decoder: bool, doc: str):
    def deco(fn):
        VISION_LOSSES.register(name)(VisionLoss(name, tokens, uses_decoder, fn, doc))
        return fn
    return deco


@_register("feature_mse", FEATURES, False, "MSE between predicted and encoder features (the paper's loss)")
def feature_mse(pred, target, target_pixels, decoder) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


@_register("pixel_l1", FEATURES, True, "L1 between the decoded prediction and the target image")
def pixel_l1(pred, target, target_pixels, decoder) -> torch.Tensor:
    images = decoder(pred, clamp=False)
    return F.l1_loss(images.float(), target_pixels.float())


@_register("code_ce", CODES, False, "cross-entropy of the predicted logits against the encoder's codes")
def code_ce(pred, target, target_pixels, decoder) -> torch.Tensor:
    return F.cross_entropy(pred.float().flatten(0, 1), target.long().flatten())


def vision_loss(name: str) -> VisionLoss:
    return VISION_LOSSES.get(name)
