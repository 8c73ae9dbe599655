"""Vision losses, registered by name. Each declares the token kind it compares, whether it goes
through the vision decoder and which inputs it takes; the model asks the loss, never its name.

A loss of your own (a plugin): ``VISION_LOSSES.register("mine")(VisionLoss("mine", FEATURES, False,
fn, "what it does", inputs=("pred", "target", "hidden")))``; ``fn`` receives the named inputs
(see :data:`LOSS_INPUTS`) as keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import VISION_LOSSES
from .base import CODES, FEATURES

# what the model can hand a vision loss, for each target image T (of N tokens)
LOSS_INPUTS = {
    "pred": "the deadapter's predictions [T, N, out_dim]",
    "target": "the encoder's tokens of the target images [T, N(, d)]",
    "target_pixels": "the target images [T, 3, H, W] in [0, 1]",
    "hidden": "the LLM hidden states the predictions were read from [T, N, d_llm]",
    "decoder": "the vision decoder (None without one)",
    "adapter": "the input adapter",
    "deadapter": "the output adapter",
    "space": "the model's TokenSpace",
}
DEFAULT_INPUTS = ("pred", "target", "target_pixels", "decoder")


@dataclass(frozen=True)
class VisionLoss:
    """``fn(**{name: value for name in inputs})`` → a scalar; ``inputs`` names what it takes among
    :data:`LOSS_INPUTS` (default: ``pred, target, target_pixels, decoder``)."""

    name: str
    tokens: str            # FEATURES | CODES: the token kind it needs
    uses_decoder: bool     # decodes the prediction to pixels (needs all N tokens and the pixels)
    fn: Callable
    doc: str
    inputs: tuple[str, ...] = DEFAULT_INPUTS

    def __post_init__(self) -> None:
        unknown = [i for i in self.inputs if i not in LOSS_INPUTS]
        if unknown:
            raise ConfigError(f"vision loss {self.name}: unknown input(s) {', '.join(unknown)}; "
                              f"a loss may take {', '.join(LOSS_INPUTS)}")

    def __call__(self, **available) -> torch.Tensor:
        return self.fn(**{k: available[k] for k in self.inputs})


def _register(name: str, tokens: str, uses_decoder: bool, doc: str, inputs: tuple[str, ...] = DEFAULT_INPUTS):
    def deco(fn):
        VISION_LOSSES.register(name)(VisionLoss(name, tokens, uses_decoder, fn, doc, inputs))
        return fn
    return deco


@_register("feature_mse", FEATURES, False, "MSE between predicted and encoder features (the paper's loss)",
           ("pred", "target"))
def feature_mse(pred, target) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


@_register("pixel_l1", FEATURES, True, "L1 between the decoded prediction and the target image",
           ("pred", "target_pixels", "decoder"))
def pixel_l1(pred, target_pixels, decoder) -> torch.Tensor:
    images = decoder(pred, clamp=False)
    return F.l1_loss(images.float(), target_pixels.float())


@_register("code_ce", CODES, False, "cross-entropy of the predicted logits against the encoder's codes",
           ("pred", "target"))
def code_ce(pred, target) -> torch.Tensor:
    return F.cross_entropy(pred.float().flatten(0, 1), target.long().flatten())


def vision_loss(name: str) -> VisionLoss:
    return VISION_LOSSES.get(name)
