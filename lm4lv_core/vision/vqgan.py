"""VQGAN families on diffusers' ``VQModel``: ``vqgan`` (continuous tokens) and ``vqgan-codes``.

* ``vqgan``: the pre-quantisation latents ``[B, C, h, w]`` (after ``quant_conv``) read in raster
  order as ``h·w`` float tokens of width C; decoded *without* snapping to the codebook
  (``decode(z, force_not_quantize=True)``), as the reference does.
* ``vqgan-codes``: the same latents quantised to codebook indices ``[B, h·w]`` in ``[0, K)``;
  decoded from the codebook entries.

SOURCE is a diffusers ``VQModel`` folder, a Hugging Face id, or a latent-diffusion / taming
checkpoint folder (``config.yaml`` + ``model.ckpt``, see :mod:`.ldm_checkpoint`). Pixels are
mapped from [0, 1] to [-1, 1] and back. The quantiser (codebook) stays in float32. The image
size is the model's ``sample_size`` unless ``image_size`` is given (the model is convolutional:
tokens = (size / 2^(levels-1))²).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import DECODERS, ENCODERS
from ..sources.hub import part_folder
from .base import PlanShape, TokenSpace, VisionDecoder, VisionEncoder, VisionPart, conv_plan_shape, require
from .ldm_checkpoint import CONFIG_FILE, is_ldm_vq_folder, ldm_vq_config, load_ldm_vqmodel

FAMILY = "vqgan"


def vq_config(path: str) -> dict:
    """The ``VQModel`` config of a folder (diffusers or latent-diffusion), no weights read."""
    require("diffusers", "diffusers", FAMILY)
    from diffusers import VQModel

    folder = part_folder(path)
    if is_ldm_vq_folder(folder):
        from ..config import load_yaml

        return ldm_vq_config(load_yaml(f"{folder}/{CONFIG_FILE}"))
    try:
        return dict(VQModel.load_config(folder))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a VQModel folder (diffusers config.json, or config.yaml + model.ckpt) ({e})"
                          ) from None


def load_vq(path: str, dtype: torch.dtype | None = None):
    """A ``VQModel`` from a diffusers folder / hub id or a latent-diffusion checkpoint folder,
    weights in ``dtype`` (default float32), codebook in float32."""
    require("diffusers", "diffusers", FAMILY)
    from diffusers import VQModel

    dtype = dtype or torch.float32
    folder = part_folder(path)
    if is_ldm_vq_folder(folder):
        return load_ldm_vqmodel(folder, dtype)
    try:
        vq = VQModel.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load a VQModel folder ({e})") from None
    vq.quantize.float()
    return vq.eval()


def _geometry(cfg: dict, image_size: int | None) -> tuple[int, int]:
    """(image size, latent grid side) of a VQModel config."""
    size = int(image_size or cfg.get("sample_size") or 256)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if size % factor:
        raise ConfigError(f"vqgan: image size {size} is not a multiple of the model's downsampling {factor}")
    return size, size // factor


class _VQPart(VisionPart):
    """Shared by the VQGAN encoder and decoder: loading, geometry, token kind."""

    codes = False  # vqgan-codes parts set True

    def __init__(self, path: str | None = None, image_size: int | None = None, dtype: torch.dtype | None = None,
                 vq=None) -> None:
        super().__init__()
        self.path = path
        vq = vq if vq is not None else load_vq(path, dtype)
        object.__setattr__(self, "_cfg", dict(vq.config))
        self.image_size, self.grid = _geometry(self._cfg, image_size)
        self.num_tokens = self.grid ** 2
        self.dim = self._cfg.get("vq_embed_dim") or self._cfg["latent_channels"]
        self.codebook_size = self._cfg["num_vq_embeddings"] if self.codes else None
        self._keep(vq)

    def _keep(self, vq) -> None:  # pragma: no cover - set by subclasses
        raise NotImplementedError

    def plan_shape(self) -> PlanShape:
        return conv_plan_shape(self._cfg, self.image_size)

    @classmethod
    def token_space(cls, path: str | None = None, image_size: int | None = None, **_) -> TokenSpace:
        cfg = vq_config(path)
        size, grid = _geometry(cfg, image_size)
        dim = cfg.get("vq_embed_dim") or cfg["latent_channels"]
        return TokenSpace(grid * grid, dim, size, cfg["num_vq_embeddings"] if cls.codes else None)

    @classmethod
    def meta(cls, path: str | None = None, image_size: int | None = None, **_) -> "_VQPart":
        from diffusers import VQModel

        part = cls(path=path, image_size=image_size, vq=VQModel.from_config(vq_config(path)))
        return part


class _VQEncoder(_VQPart, VisionEncoder):
    def _keep(self, vq) -> None:
        self.encoder, self.quant_conv = vq.encoder, vq.quant_conv
        self.quantize = vq.quantize if self.codes else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() * 2 - 1
        h = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))  # [B, C, g, g]
        b = h.shape[0]
        if self.codes:
            idx = self.quantize(h.float())[2][2]  # flattened [B * g * g]
            return idx.view(b, -1)
        return h.flatten(2).transpose(1, 2)  # raster order [B, g*g, C]


class _VQDecoder(_VQPart, VisionDecoder):
    def _keep(self, vq) -> None:
        self.post_quant_conv, self.decoder = vq.post_quant_conv, vq.decoder
        self.quantize = vq.quantize if self.codes else None

    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens → latents ``[B, C, g, g]`` (codes through the float32 codebook)."""
        b, g = tokens.shape[0], self.grid
        if self.codes:
            self.space.check(tokens, "vqgan-codes decoder")
            return self.quantize.get_codebook_entry(tokens.reshape(-1), (b, g, g, self.dim))
        return tokens.transpose(1, 2).reshape(b, self.dim, g, g)

    def forward(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"VQGAN decoder expects {self.num_tokens} tokens, got {tokens.shape[1]}")
        z = self.latents(tokens).to(self.post_quant_conv.weight.dtype)
        spatial = z if self._cfg.get("norm_type") == "spatial" else None  # MoVQ-style spatial norm reads z
        x = (self.decoder(self.post_quant_conv(z), spatial).float() + 1) / 2  # not re-quantised
        return x.clamp(0.0, 1.0) if clamp else x


@ENCODERS.register("vqgan")
class VQGANEncoder(_VQEncoder):
    """``vqgan:SOURCE``: continuous pre-quantisation latents."""


@DECODERS.register("vqgan")
class VQGANDecoder(_VQDecoder):
    """``vqgan:SOURCE``: continuous latents → pixels, without snapping to the codebook."""


@ENCODERS.register("vqgan-codes")
class VQGANCodeEncoder(_VQEncoder):
    """``vqgan-codes:SOURCE``: integer codes of the codebook."""

    codes = True


@DECODERS.register("vqgan-codes")
class VQGANCodeDecoder(_VQDecoder):
    """``vqgan-codes:SOURCE``: codes → codebook entries → pixels."""

    codes = True
