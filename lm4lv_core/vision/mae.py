"""MAE encoder and decoder from a Hugging Face ``ViTMAEForPreTraining`` folder.

``MAEAutoencoder`` pairs both for decoder fine-tuning and reconstruction.

The encoder keeps patch order (``noise = arange(N)``): with ``mask_ratio`` r (default 0, as the
reference) it keeps the first ``int(N·(1 − r))`` patches in raster order, so its output is
``[B, 1 + int(N·(1 − r)), d_v]`` (CLS first; ``[B, 1 + N, d_v]`` at r = 0). The decoder maps such
features back to pixels: decoder transformer (the dropped patches read its mask token; a decoder
built with the same ``mask_ratio`` takes the shorter sequence) → unpatchify → de-normalisation.
Pixels are normalised with the checkpoint's ``preprocessor_config.json`` statistics where the
folder has one, else ImageNet's (:mod:`.constants`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import DECODERS, ENCODERS
from .base import PlanShape, TokenSpace, VisionDecoder, VisionEncoder, checkpoint_stats, normalize
from .constants import IMAGENET, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (IMAGENET_*: public names)


# what MAEAutoencoder.save_pretrained writes (a Hugging Face model folder, its weights in one file or
# in shards), a regular expression of entry names: `ft-mae --overwrite` removes only these from final/
SAVED_ENTRIES = r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"


def check_mask_ratio(mask_ratio: float) -> float:
    r = float(mask_ratio)
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"mae: mask_ratio must be in [0, 1), got {mask_ratio}")
    return r


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many patches ViTMAE keeps at ``mask_ratio`` (its own rounding: ``int(N·(1 − r))``)."""
    return int(num_patches * (1 - mask_ratio))


def load_mae(path: str, dtype: torch.dtype | None = None):
    """Load a ``ViTMAEForPreTraining`` folder (or hub id, see :mod:`lm4lv_core.sources.hub`) with mask
    ratio 0 (an encoder sets its own), its weights read in ``dtype`` (default float32)."""
    from transformers import ViTMAEForPreTraining
    from transformers.utils import logging as hf_logging

    from ..sources.hub import resolve

    path, _ = resolve(path, "--mae")
    hf_logging.disable_progress_bar()
    try:
        return ViTMAEForPreTraining.from_pretrained(path, mask_ratio=0.0, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load an MAE (ViTMAEForPreTraining) folder ({e})") from None


def mae_config(path: str):
    """The ``ViTMAEConfig`` of an MAE folder (no weights read)."""
    from transformers import ViTMAEConfig

    try:
        return ViTMAEConfig.from_pretrained(path, mask_ratio=0.0)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read an MAE (ViTMAEForPreTraining) config ({e})") from None


class _MAEPart(nn.Module):
    """What the MAE encoder and decoder share: loading, the geometry (tokens kept at
    ``mask_ratio``) and the statistics its pixels are normalised with.

    The statistics are not buffers: a model cast to bf16 (``.to(dtype)``, DeepSpeed's bf16) would
    round them. Normalisation and de-normalisation always run in fp32.
    """

    def _setup(self, path: str | None, mae, dtype: torch.dtype | None = None, mask_ratio: float = 0.0):
        """Load (or take) the MAE, record its geometry; return it for the subclass to keep a part."""
        mae = mae if mae is not None else load_mae(path, dtype)
        cfg = self.mae_config = mae.config
        self.path = path
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.patch_size = cfg.patch_size
        self.dim = cfg.hidden_size
        self.image_size = cfg.image_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.num_tokens = 1 + kept_patches(self.num_patches, self.mask_ratio)
        folder = path if path is not None and Path(path).is_dir() else getattr(cfg, "_name_or_path", None)
        self.mean, self.std = checkpoint_stats(folder if folder and Path(folder).is_dir() else None, IMAGENET)
        return mae

    @classmethod
    def token_space(cls, path: str | None = None, mask_ratio: float = 0.0, **_) -> TokenSpace:
        c = mae_config(path)
        n = 1 + kept_patches((c.image_size // c.patch_size) ** 2, check_mask_ratio(mask_ratio))
        return TokenSpace(n, c.hidden_size, c.image_size)

    @classmethod
    def meta(cls, path: str | None = None, mask_ratio: float = 0.0, **_) -> "_MAEPart":
        from transformers import ViTMAEForPreTraining

        part = cls(mae=ViTMAEForPreTraining(mae_config(path)), mask_ratio=mask_ratio)
        part.path = path
        return part

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] → normalised fp32 (the statistics are never rounded to bf16)."""
        return normalize(pixels, self.mean, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised values → fp32 pixels (nominally in [0, 1])."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return x.float() * std + mean


def _patch_order_noise(batch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.float32).expand(batch, n)


@ENCODERS.register("mae")
class MAEEncoder(_MAEPart, VisionEncoder):
    """``path``: an MAE folder; or ``mae``: an already loaded ``ViTMAEForPreTraining`` (shared).
    ``mask_ratio``: drop that share of the patches, keeping the first ones in raster order."""

    def __init__(self, path: str | None = None, mae=None, dtype: torch.dtype | None = None,
                 mask_ratio: float = 0.0) -> None:
        super().__init__()
        self.vit = self._setup(path, mae, dtype, mask_ratio).vit
        self.vit.config.mask_ratio = self.mask_ratio  # ViTMAE reads the ratio from its config

    def plan_shape(self) -> PlanShape:
        c = self.mae_config
        return PlanShape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, self.num_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels).to(self.vit.embeddings.patch_embeddings.projection.weight.dtype)
        noise = _patch_order_noise(x.shape[0], self.num_patches, x.device)
        return self.vit(pixel_values=x, noise=noise).last_hidden_state


@DECODERS.register("mae")
class MAEDecoder(_MAEPart, VisionDecoder):
    """``path``: an MAE folder; or ``mae``: an already loaded ``ViTMAEForPreTraining`` (shared).
    ``mask_ratio``: take the tokens of an encoder with that ratio (the dropped patches are
    painted from the decoder's mask token)."""

    def __init__(self, path: str | None = None, mae=None, dtype: torch.dtype | None = None,
                 mask_ratio: float = 0.0) -> None:
        super().__init__()
        self.decoder = self._setup(path, mae, dtype, mask_ratio).decoder

    def plan_shape(self) -> PlanShape:
        c = self.mae_config
        return PlanShape(c.decoder_hidden_size, c.decoder_num_hidden_layers, c.decoder_intermediate_size,
                         self.num_tokens)

    def forward(self, features: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """``clamp=False`` keeps gradients for pixels outside [0, 1] (used when training)."""
        b, n, _ = features.shape
        if n != self.num_tokens:
            raise ValueError(f"MAE decoder expects {self.num_tokens} tokens, got {n}")
        features = features.to(self.decoder.decoder_embed.weight.dtype)
        ids_restore = torch.arange(self.num_patches, device=features.device).expand(b, -1)
        patches = self.decoder(features, ids_restore).logits  # [B, N, p*p*3]
        p, g = self.patch_size, self.image_size // self.patch_size
        x = patches.float().reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)
        x = self.denormalize(x)
        return x.clamp(0.0, 1.0) if clamp else x


class MAEAutoencoder(nn.Module):
    """Encoder + decoder of one ``ViTMAEForPreTraining``; only the decoder trains by default.

    ``dtype`` is the compute dtype (default float32). With ``train=False`` (reconstruction) the
    whole MAE is read from disk in it. When training, the MAE is read in float32 so the trainable
    decoder's master weights are exact, and a frozen encoder is then cast to ``dtype``.
    """

    def __init__(self, path: str, train_encoder: bool = False, dtype: torch.dtype | None = None,
                 train: bool = True) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        hf = load_mae(path, torch.float32 if train else dtype)
        self.path = path
        object.__setattr__(self, "_hf", hf)  # not a submodule: its parts are registered below
        self.encoder = MAEEncoder(path, mae=hf)
        self.decoder = MAEDecoder(path, mae=hf)
        self.image_size = self.encoder.image_size
        self.train_encoder = train_encoder
        for p in self.encoder.parameters():
            p.requires_grad_(train_encoder)
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        if train:
            from ..precision import cast_by_trainability

            cast_by_trainability(self, dtype, torch.float32)

    def train(self, mode: bool = True) -> "MAEAutoencoder":
        """A frozen encoder stays in eval mode whatever ``mode`` is (no dropout in a frozen part)."""
        super().train(mode)
        if not self.train_encoder:
            self.encoder.eval()
        return self

    def forward(self, pixels: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → reconstruction ``[B, 3, H, W]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            feats = self.encoder(pixels)
        return self.decoder(feats, clamp=clamp)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a complete Hugging Face ``ViTMAEForPreTraining`` folder into ``path``.

        ``state_dict`` (this module's names, e.g. all parameters gathered from ZeRO-3 partitions)
        overrides the module's own tensors in what is written. Weights held in a lower precision
        while training are written in float32; a frozen part is then written exactly as it was
        read (from the source folder), not rounded through the compute dtype.
        """
        hf = self._hf
        reread = any(p.dtype != torch.float32 for p in hf.parameters())
        if reread:
            hf = load_mae(self.path, torch.float32)
        hf_sd = hf.state_dict()
        updates = state_dict if state_dict is not None else (self.state_dict() if reread else {})
        for k, v in updates.items():
            part, hf_key = k.split(".", 1)  # encoder.vit.* → vit.*, decoder.decoder.* → decoder.*
            if reread and not (part == "decoder" or self.train_encoder):
                continue  # frozen: keep the source's exact weights
            if hf_key not in hf_sd:
                if state_dict is None:
                    continue
                raise ValueError(f"unexpected MAE weight: {k}")
            hf_sd[hf_key] = v.to(hf_sd[hf_key].dtype)
        Path(path).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(path), state_dict=hf_sd)
