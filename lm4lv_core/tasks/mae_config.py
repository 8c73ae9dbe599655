"""What ``lm4lv ft-mae`` trains (:class:`MAEFinetuneConfig`), apart from the task itself
(:mod:`lm4lv_core.tasks.mae_decoder`) so that the command line reads its options without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import option
from ..errors import ConfigError
from ..util.finite import require_finite


@dataclass
class MAEFinetuneConfig:
    """What ``lm4lv ft-mae`` trains: the MAE folder and the loss ``L1 + lpips_weight · LPIPS``.
    Each field with a doc shown in ``--help`` is the ``ft-mae`` option of the same name.

    LPIPS uses VGG16 by default, the perceptual network of the reference's decoder fine-tuning."""

    mae: str = option(doc="MAE (ViTMAEForPreTraining) to start from: a folder or a Hugging Face id "
                      "org/name[@revision].", panel="Vision", shows="the --preset's MAE")
    lpips_weight: float = option(1.0, "λ of L1 + λ·LPIPS; 0 disables LPIPS.", panel="Training")
    lpips_net: str = option("vgg", "LPIPS backbone: alex | vgg (vgg, as the reference).", panel="Training")
    lpips_weights: str | None = option(None, "torchvision backbone state dict.", panel="Training",
                                       shows="the torch hub cache, e.g. vgg16-397923af.pth")
    train_encoder: bool = option(False, "Also train the encoder.", panel="What trains",
                                 flags="--train-encoder/--freeze-encoder")
    hub: dict[str, Any] = option(doc="The MAE's hub snapshot when --mae is a hub id: {mae: {id, revision, commit, "
                                 "path}}.", cli=False, factory=dict)

    def __post_init__(self) -> None:
        require_finite(self, ("lpips_weight",))
        if self.lpips_weight < 0:
            raise ConfigError(f"--lpips-weight must be >= 0, got {self.lpips_weight}")

    def build_lpips(self):
        """The frozen LPIPS module, or ``None`` when its weight is 0 (L1 only)."""
        if self.lpips_weight == 0:
            return None
        from ..image.metrics import build_lpips

        return build_lpips(self.lpips_net, self.lpips_weights)
