"""Understanding encoders (no decoder: captioning, VQA-style text answers).

* ``clip``, ``siglip``, ``dinov2``: a transformers vision tower folder or Hugging Face id
  (``CLIPVisionModel`` — a full ``CLIPModel`` folder works too —, ``SiglipVisionModel``,
  ``Dinov2Model``). Tokens are ``last_hidden_state`` (CLIP's is before its post-layernorm), or the
  hidden states of ``layer`` when given. SigLIP: (S/P)² tokens; DINOv2: 1 + registers + (S/P)²,
  or without the CLS token with ``clear_cls``.
* ``clip`` ``feature``: ``local`` (default) — the patch tokens after the transformer, CLS dropped
  (kept with ``keep_cls``), no post-layernorm: (S/P)² tokens (256 for ViT-L/14 at 224 px);
  ``global`` — the projected image embedding (post-layernorm CLS through the visual projection),
  1 token of ``projection_dim``; needs a ``CLIPVisionModelWithProjection`` or full ``CLIPModel``
  folder.
* ``timm:MODEL[:CHECKPOINT]``: any timm ViT by name, its weights from CHECKPOINT (safetensors or a
  torch file read with ``weights_only``; MoCo v3's ``module.base_encoder.`` prefix and other
  wrappers' ``module.`` prefixes are stripped, classifier heads dropped). Tokens are
  ``forward_features``; ``num_prefix_tokens`` of them are class / register tokens.

Pixels in [0, 1] are normalised with the model's own mean / std (its preprocessor config, timm's
``pretrained_cfg``), else the family's published statistics (:mod:`.constants`), in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError
from ..registry import ENCODERS
from ..util.params import parameter_dtype
from .base import PlanShape, VisionEncoder, checkpoint_stats, normalize, preprocessor_config, require
from .constants import HALF, IMAGENET, OPENAI_CLIP


class _Normalised(VisionEncoder):
    """Mean / std normalisation in float32 (not buffers: a bf16 cast must not round them)."""

    mean: tuple[float, ...] = IMAGENET[0]
    std: tuple[float, ...] = IMAGENET[1]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(pixels, self.mean, self.std)


def _crop(pre: dict) -> int | None:
    c = pre.get("crop_size") or pre.get("size")
    if isinstance(c, dict):
        c = c.get("height") or c.get("shortest_edge")
    return int(c) if c else None


class _HFEncoder(_Normalised):
    """A transformers vision tower. Subclasses name the class, the default statistics, how many
    tokens the model gives and which of its outputs they are."""

    hf_class: str
    default_stats = IMAGENET

    def __init__(self, path: str, layer: int | None = None, image_size: int | None = None,
                 dtype: torch.dtype | None = None, model=None, **options) -> None:
        super().__init__()
        import transformers
        from transformers.utils import logging as hf_logging

        from ..sources.hub import resolve

        hf_logging.disable_progress_bar()
        self._options(layer=layer, **options)
        self.path = path
        folder = resolve(path, "--encoder")[0]
        hf_class = self.model_class(**options)
        if model is None:
            try:
                model, info = getattr(transformers, hf_class).from_pretrained(
                    folder, dtype=dtype or torch.float32, output_loading_info=True,
                    **self.config_overrides(folder, **options))
            except (OSError, ValueError, RuntimeError) as e:
                raise ConfigError(f"{path}: cannot load a {hf_class} folder ({str(e).splitlines()[0]})") from None
            self.check_loaded(path, set(info.get("missing_keys") or ()))
        self.model = model
        cfg = model.config
        self.mean, self.std = checkpoint_stats(folder, self.default_stats)
        self.layer = layer
        self.image_size = int(image_size or _crop(preprocessor_config(folder)) or cfg.image_size)
        self.patch = cfg.patch_size
        self.dim = self.width(cfg)
        self.num_tokens = self.count(cfg, (self.image_size // self.patch) ** 2)
        object.__setattr__(self, "_cfg", cfg)

    def _options(self, layer: int | None = None, **options) -> None:
        """Record (and check) the family's own keyword arguments."""
        if options:
            raise ConfigError(f"{type(self).__name__}: unknown option(s) {', '.join(sorted(options))}")

    @classmethod
    def model_class(cls, **_) -> str:
        return cls.hf_class

    @classmethod
    def config_overrides(cls, folder: str, **_) -> dict:
        """Config fields to set when reading ``folder`` (none by default)."""
        return {}

    def check_loaded(self, path: str, missing: set[str]) -> None:
        """Refuse a folder without weights this setting needs (none by default)."""

    @staticmethod
    def prefix_tokens(cfg) -> int:
        return 1

    def count(self, cfg, patches: int) -> int:
        """Tokens per image for ``patches`` patches."""
        return self.prefix_tokens(cfg) + patches

    def width(self, cfg) -> int:
        return cfg.hidden_size

    def select(self, out) -> torch.Tensor:
        """The tokens among the model's outputs."""
        return out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]

    @classmethod
    def meta(cls, path: str, layer: int | None = None, image_size: int | None = None, **options) -> "_HFEncoder":
        import transformers

        from ..sources.hub import resolve

        folder = resolve(path, "--encoder")[0]
        hf_class = cls.model_class(**options)
        cfg_cls = getattr(transformers, hf_class).config_class
        try:
            cfg = cfg_cls.from_pretrained(folder, **cls.config_overrides(folder, **options))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read a {hf_class} config ({e})") from None
        return cls(folder, layer=layer, image_size=image_size, model=getattr(transformers, hf_class)(cfg), **options)

    @classmethod
    def token_space(cls, **kwargs):
        with torch.device("meta"):
            return cls.meta(**kwargs).space

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
        return self.select(out)


CLIP_FEATURES = ("local", "global")


@ENCODERS.register("clip")
class CLIPEncoder(_HFEncoder):
    """``clip:SOURCE``: a CLIP vision tower. ``feature="local"`` (default): the (S/P)² patch tokens
    after the transformer (CLS dropped unless ``keep_cls``; no post-layernorm); ``"global"``: the
    projected image embedding, one token of ``projection_dim``."""

    hf_class = "CLIPVisionModel"
    default_stats = OPENAI_CLIP

    def __init__(self, path: str, layer: int | None = None, image_size: int | None = None,
                 dtype: torch.dtype | None = None, model=None, feature: str = "local",
                 keep_cls: bool = False) -> None:
        super().__init__(path, layer, image_size, dtype, model, feature=feature, keep_cls=keep_cls)

    def _options(self, layer: int | None = None, feature: str = "local", keep_cls: bool = False) -> None:
        if feature not in CLIP_FEATURES:
            raise ConfigError(f"clip: feature must be one of {', '.join(CLIP_FEATURES)}, got {feature!r}")
        if feature == "global" and (layer is not None or keep_cls):
            raise ConfigError("clip: feature global is the projected image embedding (one token); "
                              "layer and keep_cls apply to feature local")
        self.feature, self.keep_cls = feature, bool(keep_cls)

    @classmethod
    def model_class(cls, feature: str = "local", **_) -> str:
        return "CLIPVisionModelWithProjection" if feature == "global" else cls.hf_class

    @classmethod
    def config_overrides(cls, folder: str, feature: str = "local", **_) -> dict:
        """A full ``CLIPModel`` folder keeps ``projection_dim`` at its top level, not in its vision config."""
        f = Path(folder) / "config.json"
        top = json.loads(f.read_text()) if feature == "global" and f.is_file() else {}
        return {"projection_dim": top["projection_dim"]} if "vision_config" in top and "projection_dim" in top else {}

    def check_loaded(self, path: str, missing: set[str]) -> None:
        if self.feature == "global" and any(k.startswith("visual_projection") for k in missing):
            raise ConfigError(f"clip {path}: feature global needs the visual projection, which this folder "
                              "lacks (a CLIPVisionModel); give a full CLIPModel or CLIPVisionModelWithProjection")

    def count(self, cfg, patches: int) -> int:
        return 1 if self.feature == "global" else patches + int(self.keep_cls)

    def width(self, cfg) -> int:
        return cfg.projection_dim if self.feature == "global" else cfg.hidden_size

    def select(self, out) -> torch.Tensor:
        if self.feature == "global":
            return out.image_embeds.unsqueeze(1)
        tokens = super().select(out)
        return tokens if self.keep_cls else tokens[:, 1:]


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
    """``dinov2:SOURCE``: DINOv2 (257 tokens at 224 px / 14, + its register tokens); ``clear_cls``
    drops the CLS token (256), as the reference's option of that name."""

    hf_class = "Dinov2Model"

    def __init__(self, path: str, layer: int | None = None, image_size: int | None = None,
                 dtype: torch.dtype | None = None, model=None, clear_cls: bool = False) -> None:
        super().__init__(path, layer, image_size, dtype, model, clear_cls=clear_cls)

    def _options(self, layer: int | None = None, clear_cls: bool = False) -> None:
        self.clear_cls = bool(clear_cls)

    @staticmethod
    def prefix_tokens(cfg) -> int:
        return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)

    def count(self, cfg, patches: int) -> int:
        return self.prefix_tokens(cfg) + patches - int(self.clear_cls)

    def select(self, out) -> torch.Tensor:
        tokens = super().select(out)
        return tokens[:, 1:] if self.clear_cls else tokens


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
            try:
                missing, unexpected = net.load_state_dict(sd, strict=False)
            except RuntimeError as e:  # tensors of other shapes: another model's checkpoint
                why = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
                raise ConfigError(f"timm checkpoint {checkpoint}: does not fit timm:{model} ({why})") from None
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
            return cls.meta(**kwargs).space

    def plan_shape(self) -> PlanShape:
        blocks = getattr(self.net, "blocks", [])
        mlp = getattr(blocks[0], "mlp", None) if len(blocks) else None
        inter = mlp.fc1.out_features if mlp is not None and hasattr(mlp, "fc1") else 4 * self.dim
        return PlanShape(self.dim, len(blocks), inter, self.num_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels).to(parameter_dtype(self.net))
        return self.net.forward_features(x)
