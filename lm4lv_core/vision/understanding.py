"""Understanding encoders (no decoder: captioning, VQA-style text answers).

* ``clip``, ``siglip``, ``dinov2``: a transformers vision tower folder or Hugging Face id
  (``CLIPVisionModel`` — a full ``CLIPModel`` folder works too —, ``SiglipVisionModel``,
  ``Dinov2Model``). Tokens are ``last_hidden_state`` (CLIP's is before its post-layernorm), or the
  hidden states of ``layer`` when given. CLIP: 1 + (S/P)² tokens; SigLIP: (S/P)²; DINOv2:
  1 + registers + (S/P)².
* ``timm:MODEL[:CHECKPOINT]``: any timm ViT by name, its weights from CHECKPOINT (safetensors or a
  torch file read with ``weights_only``; MoCo v3's ``module.base_encoder.`` prefix and other
  wrappers' ``module.`` prefixes are stripped, classifier heads dropped). Tokens are
  ``forward_features``; ``num_prefix_tokens`` of them are class / register tokens.

Pixels in [0, 1] are normalised with the model's own mean / std (its preprocessor config, timm's
``pretrained_cfg``), computed in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError
from ..registry import ENCODERS
from ..util.params import parameter_dtype
from .base import PlanShape, VisionEncoder, require

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class _Normalised(VisionEncoder):
    """Mean / std normalisation in float32 (not buffers: a bf16 cast must not round them)."""

    mean: tuple[float, ...] = IMAGENET[0]
    std: tuple[float, ...] = IMAGENET[1]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() - m) / s


def _preprocessor(folder: str) -> dict:
    f = Path(folder) / "preprocessor_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _crop(pre: dict) -> int | None:
    c = pre.get("crop_size") or pre.get("size")
    if isinstance(c, dict):
        c = c.get("height") or c.get("shortest_edge")
    return int(c) if c else None


class _HFEncoder(_Normalised):
    """A transformers vision tower. Subclasses name the class, the default statistics and how many
    prefix (class / register) tokens the model adds."""

    hf_class: str
    default_stats = IMAGENET

    def __init__(self, path: str, layer: int | None = None, image_size: int | None = None,
                 dtype: torch.dtype | None = None, model=None) -> None:
        super().__init__()
        import transformers
        from transformers.utils import logging as hf_logging

        from ..sources.hub import resolve

        hf_logging.disable_progress_bar()
        self.path = path
        folder = resolve(path, "--encoder")[0]
        if model is None:
            try:
                model = getattr(transformers, self.hf_class).from_pretrained(folder, dtype=dtype or torch.float32)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}: cannot load a {self.hf_class} folder ({e})") from None
        self.model = model
        cfg = model.config
        pre = _preprocessor(folder)
        self.mean = tuple(pre.get("image_mean") or self.default_stats[0])
        self.std = tuple(pre.get("image_std") or self.default_stats[1])
        self.layer = layer
        self.image_size = int(image_size or _crop(pre) or cfg.image_size)
        self.patch = cfg.patch_size
        self.dim = cfg.hidden_size
        self.num_tokens = self.prefix_tokens(cfg) + (self.image_size // self.patch) ** 2
        object.__setattr__(self, "_cfg", cfg)

    @staticmethod
    def prefix_tokens(cfg) -> int:
        return 1

    @classmethod
    def meta(cls, path: str, layer: int | None = None, image_size: int | None = None, **_) -> "_HFEncoder":
        import transformers

        from ..sources.hub import resolve

        folder = resolve(path, "--encoder")[0]
        cfg_cls = getattr(transformers, cls.hf_class).config_class
        try:
            cfg = cfg_cls.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read a {cls.hf_class} config ({e})") from None
        return cls(folder, layer=layer, image_size=image_size, model=getattr(transformers, cls.hf_class)(cfg))

    @classmethod
    def token_space(cls, **kwargs):
        with torch.device("meta"):
            return cls.meta(**kwargs).tokens

    def plan_shape(self) -> PlanShape:
        c = self._cfg
        return PlanShape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, self.num_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels).to(parameter_dtype(self.model))
        if x.shape[-1] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                                align_corners=False)
        kw = {"interpolate_pos_encoding": True} if self.image_size != self._cfg.image_size else {}
        out = self.model(pixel_values=x, output_hidden_states=self.layer is not None, **kw)
        return out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]


@ENCODERS.register("clip")
class CLIPEncoder(_HFEncoder):
    """``clip:SOURCE``: a CLIP vision tower (197 tokens at 224 px / 16)."""

    hf_class = "CLIPVisionModel"
    default_stats = OPENAI_CLIP


@ENCODERS.register("siglip")
class SiglipEncoder(_HFEncoder):
    """``siglip:SOURCE``: a SigLIP vision tower (no class token: 196 tokens at 224 px / 16)."""

    hf_class = "SiglipVisionModel"
    default_stats = HALF

    @staticmethod
    def prefix_tokens(cfg) -> int:
        return 0


@ENCODERS.register("dinov2")
class Dinov2Encoder(_HFEncoder):
    """``dinov2:SOURCE``: DINOv2 (257 tokens at 224 px / 14, + its register tokens)."""

    hf_class = "Dinov2Model"

    @staticmethod
    def prefix_tokens(cfg) -> int:
        return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


# ------------------------------------------------------------------------------------------ timm
STRIP_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.encoder_q.", "module.")


def read_timm_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A timm model's weights from a safetensors or torch file (``state_dict`` / ``model`` entries
    unwrapped, wrapper prefixes stripped; never unpickles code)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"timm checkpoint {path}: file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise ConfigError(f"timm checkpoint {path}: not a readable weights file ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        for pre in STRIP_PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        out[k] = v
    return out


@ENCODERS.register("timm")
class TimmEncoder(_Normalised):
    """``timm:MODEL[:CHECKPOINT]``: a timm ViT, tokens from ``forward_features``. Extra keyword
    arguments (``model_kwargs``) go to ``timm.create_model`` (e.g. ``img_size``)."""

    def __init__(self, model: str, checkpoint: str | None = None, model_kwargs: dict | None = None,
                 dtype: torch.dtype | None = None, _meta: bool = False) -> None:
        super().__init__()
        timm = require("timm", "timm", "timm")
        self.model_name, self.checkpoint = model, checkpoint
        try:
            net = timm.create_model(model, pretrained=False, num_classes=0, **(model_kwargs or {}))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConfigError(f"timm:{model}: cannot build this timm model ({str(e).splitlines()[0]})") from None
        if checkpoint and not _meta:
            sd = {k: v for k, v in read_timm_checkpoint(checkpoint).items() if not k.startswith(("head.", "fc."))}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ConfigError(f"timm checkpoint {checkpoint}: does not fit timm:{model} (missing "
                                  f"{', '.join(missing[:3]) or '-'}; unexpected {', '.join(unexpected[:3]) or '-'})")
        self.net = net.to(dtype) if dtype is not None else net
        cfg = net.pretrained_cfg or {}
        self.mean, self.std = tuple(cfg.get("mean", IMAGENET[0])), tuple(cfg.get("std", IMAGENET[1]))
        self.image_size = int(net.patch_embed.img_size[0])
        self.dim = net.num_features
        self.num_tokens = int(net.num_prefix_tokens) + int(net.patch_embed.num_patches)

    @classmethod
    def source_kwargs(cls, source: str) -> dict:
        name, _, ckpt = source.partition(":")
        if not name:
            raise ConfigError("--encoder timm:MODEL_NAME[:CHECKPOINT] needs a timm model name")
        return {"model": name, **({"checkpoint": ckpt} if ckpt else {})}

    @classmethod
    def meta(cls, **kwargs) -> "TimmEncoder":
        return cls(**kwargs, _meta=True)

    @classmethod
    def token_space(cls, **kwargs):
        with torch.device("meta"):
            return cls.meta(**kwargs).tokens

    def plan_shape(self) -> PlanShape:
        blocks = getattr(self.net, "blocks", [])
        mlp = getattr(blocks[0], "mlp", None) if len(blocks) else None
        inter = mlp.fc1.out_features if mlp is not None and hasattr(mlp, "fc1") else 4 * self.dim
        return PlanShape(self.dim, len(blocks), inter, self.num_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels).to(parameter_dtype(self.net))
        return self.net.forward_features(x)
