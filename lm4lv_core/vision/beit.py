"""The BEiT family: ``beit`` encoder and ``beit-dvae`` decoder.

* ``beit:SOURCE``: a ``BeitForMaskedImageModeling`` folder or Hugging Face id; tokens are the
  hidden states of ``layer`` (default: the last, as the reference's ``layer``) through the
  masked-image-modelling layernorm, ``[B, 1 + (S/P)², d]`` (CLS first). Pixels are normalised
  with the checkpoint's ``preprocessor_config.json`` statistics, else 0.5 / 0.5 (BEiT's own
  processor and the reference).
* ``beit-dvae:BEIT_SOURCE,DVAE``: BEiT's masked-image-modelling head reads those features, its
  argmax over the visual vocabulary gives one DALL-E code per patch, and the DALL-E dVAE decoder
  (:mod:`.dalle_dvae`; OpenAI's ``decoder.pkl`` read safely, or a converted folder) paints them:
  a 14×14 code grid becomes a 112 px image for a 224 px input. The argmax is not differentiable,
  so pixel losses cannot train through this decoder; the dVAE runs in float32.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import DECODERS, ENCODERS
from ..sources.hub import part_folder
from .base import PlanShape, TokenSpace, VisionDecoder, VisionEncoder, checkpoint_stats, normalize
from .constants import HALF

HF_CLASS = "BeitForMaskedImageModeling"


def beit_config(path: str):
    from transformers import BeitConfig

    try:
        return BeitConfig.from_pretrained(part_folder(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read a BEiT config ({e})") from None


def load_beit(path: str, dtype: torch.dtype | None = None):
    from transformers import BeitForMaskedImageModeling
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return BeitForMaskedImageModeling.from_pretrained(part_folder(path), dtype=dtype or torch.float32).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load a {HF_CLASS} folder ({e})") from None


def _tokens(cfg) -> int:
    return 1 + (cfg.image_size // cfg.patch_size) ** 2


class _BeitPart:
    def _geometry(self, cfg) -> None:
        self.dim = cfg.hidden_size
        self.num_tokens = _tokens(cfg)
        self.grid = cfg.image_size // cfg.patch_size
        object.__setattr__(self, "_cfg", cfg)


@ENCODERS.register("beit")
class BeitEncoder(_BeitPart, VisionEncoder):
    """``beit:SOURCE``: hidden states of ``layer`` (default last) through the MIM layernorm."""

    def __init__(self, path: str, layer: int = -1, dtype: torch.dtype | None = None, model=None) -> None:
        super().__init__()
        self.path, self.layer = path, layer
        model = model if model is not None else load_beit(path, dtype)
        self.mean, self.std = checkpoint_stats(part_folder(path), HALF)
        self.beit, self.layernorm = model.beit, model.layernorm
        self._geometry(model.config)
        self.image_size = model.config.image_size

    @classmethod
    def token_space(cls, path: str, **_) -> TokenSpace:
        c = beit_config(path)
        return TokenSpace(_tokens(c), c.hidden_size, c.image_size)

    @classmethod
    def meta(cls, path: str, layer: int = -1, **_) -> "BeitEncoder":
        from transformers import BeitForMaskedImageModeling

        return cls(path, layer, model=BeitForMaskedImageModeling(beit_config(path)))

    def plan_shape(self) -> PlanShape:
        c = self._cfg
        return PlanShape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, self.num_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels, self.mean, self.std).to(self.layernorm.weight.dtype)
        out = self.beit(pixel_values=x, output_hidden_states=True)
        return self.layernorm(out.hidden_states[self.layer])


@DECODERS.register("beit-dvae")
class BeitDvaeDecoder(_BeitPart, VisionDecoder):
    """``beit-dvae:BEIT_SOURCE,DVAE``: MIM head → argmax codes → DALL-E dVAE decoder."""

    differentiable = False

    def __init__(self, path: str, dvae: str, dtype: torch.dtype | None = None, model=None, _meta: bool = False) -> None:
        super().__init__()
        from .dalle_dvae import DalleDecoder, load_dalle_decoder

        self.path, self.dvae_path = path, dvae
        model = model if model is not None else load_beit(path, dtype)
        self.lm_head = model.lm_head
        self._geometry(model.config)
        self.dvae = DalleDecoder(vocab_size=model.config.vocab_size) if _meta else load_dalle_decoder(dvae)
        if self.dvae.vocab_size != model.config.vocab_size:
            raise ConfigError(f"dVAE {dvae}: a vocabulary of {self.dvae.vocab_size} codes, but BEiT {path} predicts "
                              f"{model.config.vocab_size}")
        self.image_size = self.grid * self.dvae.upscale

    @classmethod
    def source_kwargs(cls, source: str) -> dict:
        beit, _, dvae = source.partition(",")
        if not beit or not dvae:
            raise ConfigError("--decoder beit-dvae:BEIT_SOURCE,DVAE_DECODER needs both the BEiT model and the "
                              "DALL-E dVAE decoder (decoder.pkl or a converted folder)")
        return {"path": beit.strip(), "dvae": dvae.strip()}

    @classmethod
    def token_space(cls, path: str, **_) -> TokenSpace:
        return BeitEncoder.token_space(path)

    @classmethod
    def meta(cls, path: str, dvae: str, **_) -> "BeitDvaeDecoder":
        from transformers import BeitForMaskedImageModeling

        return cls(path, dvae, model=BeitForMaskedImageModeling(beit_config(path)), _meta=True)

    def codes(self, features: torch.Tensor) -> torch.Tensor:
        """BEiT features ``[B, 1 + g², d]`` → DALL-E codes ``[B, g, g]`` (argmax of the MIM head)."""
        logits = self.lm_head(features[:, 1:].to(self.lm_head.weight.dtype))
        return logits.argmax(-1).view(features.shape[0], self.grid, self.grid)

    def forward(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"beit-dvae decoder expects {self.num_tokens} tokens, got {tokens.shape[1]}")
        x = self.dvae.decode_codes(self.codes(tokens))
        return x.clamp(0.0, 1.0) if clamp else x
