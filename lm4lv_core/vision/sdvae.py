"""The ``sd-vae`` family on diffusers' ``AutoencoderKL`` (Stable-Diffusion-style latent VAEs).

Tokens are the posterior's mode scaled as diffusion models see it, ``(mean − shift) · scale``
(the VAE's ``scaling_factor`` and, where it has one, ``shift_factor``), cut into 2×2 patches:
``[B, C, H, W] → [B, (H/2)(W/2), 4C]`` in raster order (C = 4: 16-dim tokens, 196 tokens at
224 px for an 8× VAE). The decoder inverts each step exactly. SOURCE is a diffusers
``AutoencoderKL`` folder or a Hugging Face id.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import DECODERS, ENCODERS
from ..sources.hub import part_folder
from ..util.params import parameter_dtype
from .base import PlanShape, TokenSpace, VisionDecoder, VisionEncoder, VisionPart, conv_plan_shape, require

FAMILY = "sd-vae"
PATCH = 2  # latent pixels per token side


def vae_config(path: str) -> dict:
    require("diffusers", "diffusers", FAMILY)
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(part_folder(path)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not an AutoencoderKL folder ({e})") from None


def load_vae(path: str, dtype: torch.dtype | None = None):
    require("diffusers", "diffusers", FAMILY)
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(part_folder(path), torch_dtype=dtype or torch.float32).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load an AutoencoderKL folder ({e})") from None


def _geometry(cfg: dict, image_size: int | None) -> tuple[int, int]:
    """(image size, token grid side): the latent is ``size / 2^(levels-1)``, tokens 2×2 of it."""
    size = int(image_size or cfg.get("sample_size") or 256)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1) * PATCH
    if size % factor:
        raise ConfigError(f"sd-vae: image size {size} is not a multiple of {factor} (downsampling × 2×2 tokens)")
    return size, size // factor


def patchify(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] → [B, (H/2)(W/2), 4C]`` (raster order; each token is C × 2 × 2)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpatchify(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """The exact inverse of :func:`patchify` for a ``grid × grid`` token square."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    return tokens.view(b, grid, grid, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c, grid * PATCH, grid * PATCH)


class _VAEPart(VisionPart):
    def __init__(self, path: str | None = None, image_size: int | None = None, dtype: torch.dtype | None = None,
                 vae=None) -> None:
        super().__init__()
        self.path = path
        vae = vae if vae is not None else load_vae(path, dtype)
        cfg = dict(vae.config)
        object.__setattr__(self, "_cfg", cfg)
        self.image_size, self.grid = _geometry(cfg, image_size)
        self.num_tokens = self.grid ** 2
        self.dim = cfg["latent_channels"] * PATCH * PATCH
        self.scale = float(cfg.get("scaling_factor") or 1.0)
        self.shift = float(cfg.get("shift_factor") or 0.0)
        self._keep(vae)

    def _keep(self, vae) -> None:  # pragma: no cover - set by subclasses
        raise NotImplementedError

    def plan_shape(self) -> PlanShape:
        return conv_plan_shape(self._cfg, self.image_size)

    @classmethod
    def token_space(cls, path: str | None = None, image_size: int | None = None, **_) -> TokenSpace:
        cfg = vae_config(path)
        size, grid = _geometry(cfg, image_size)
        return TokenSpace(grid * grid, cfg["latent_channels"] * PATCH * PATCH, size)

    @classmethod
    def meta(cls, path: str | None = None, image_size: int | None = None, **_) -> "_VAEPart":
        from diffusers import AutoencoderKL

        return cls(path=path, image_size=image_size, vae=AutoencoderKL.from_config(vae_config(path)))


@ENCODERS.register(FAMILY)
class SDVAEEncoder(_VAEPart, VisionEncoder):
    """``sd-vae:SOURCE``: scaled posterior modes, 2×2-patchified."""

    def _keep(self, vae) -> None:
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() * 2 - 1).to(parameter_dtype(self.encoder))
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h.chunk(2, dim=1)[0]  # the posterior's mode
        return patchify((mean.float() - self.shift) * self.scale)


@DECODERS.register(FAMILY)
class SDVAEDecoder(_VAEPart, VisionDecoder):
    """``sd-vae:SOURCE``: tokens → unscaled latents → pixels."""

    def _keep(self, vae) -> None:
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"sd-vae decoder expects {self.num_tokens} tokens, got {tokens.shape[1]}")
        z = unpatchify(tokens.float(), self.grid) / self.scale + self.shift
        z = z.to(parameter_dtype(self.decoder))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = (self.decoder(z).float() + 1) / 2
        return x.clamp(0.0, 1.0) if clamp else x
