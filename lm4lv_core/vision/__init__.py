"""Vision families: encoders, decoders, adapters and vision losses, built by name from the
registries, and the questions the rest of lm4lv asks about them (see :mod:`.base`).

Every module of this package is imported here, so a new built-in family is one file that
registers its parts; a user's own parts come from plugins (:mod:`lm4lv_core.plugins`)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import torch

from ..config import ModelConfig, ModuleSpec
from ..errors import ConfigError
from ..plugins import split_target
from ..registry import ADAPTERS, DECODERS, ENCODERS

for _m in pkgutil.iter_modules(__path__):  # registers the built-in parts
    importlib.import_module(f"{__name__}.{_m.name}")
del _m

from .adapters import ADAPTER, DEADAPTER, AdapterTraits, adapter_traits, declare_adapter
from .base import CODES, FEATURES, PlanShape, TokenSpace, VisionDecoder, VisionEncoder
from .losses import VisionLoss, vision_loss


def _build(cls, kwargs: dict, dtype: torch.dtype | None):
    """``cls(**kwargs)`` with its weights in ``dtype``: read in it directly when the constructor
    takes a ``dtype``, else cast after building."""
    if dtype is not None and "dtype" in inspect.signature(cls).parameters:
        return cls(**kwargs, dtype=dtype)
    part = cls(**kwargs)
    return part.to(dtype) if dtype is not None else part


def build_encoder(spec: ModuleSpec, dtype: torch.dtype | None = None) -> VisionEncoder:
    return _build(ENCODERS.get(spec.name), spec.kwargs, dtype)


def build_decoder(spec: ModuleSpec | None, dtype: torch.dtype | None = None) -> VisionDecoder | None:
    return _build(DECODERS.get(spec.name), spec.kwargs, dtype) if spec is not None else None


def meta_part(spec: ModuleSpec, part: str):
    """The encoder / decoder of ``spec`` with its parameters on the meta device (configs only)."""
    reg = ENCODERS if part == "encoder" else DECODERS
    with torch.device("meta"):
        return reg.get(spec.name).meta(**spec.kwargs)


def build_adapter(spec: ModuleSpec, in_dim: int, out_dim: int, partner=None):
    fn = ADAPTERS.get(spec.name)
    kwargs = dict(spec.kwargs)
    if "partner" in inspect.signature(fn).parameters:
        kwargs["partner"] = partner
    return fn(in_dim=in_dim, out_dim=out_dim, **kwargs)


def parse_part(text: str, part: str) -> ModuleSpec | None:
    """``FAMILY:SOURCE`` or ``package.module:Class:SOURCE`` (``--encoder`` / ``--decoder``) → a
    registry spec; ``none`` → no part. The family reads its own SOURCE (a folder or hub id;
    ``timm:MODEL[:CHECKPOINT]``)."""
    if part == "decoder" and text.strip().lower() == "none":
        return None
    reg = ENCODERS if part == "encoder" else DECODERS
    family, source = split_target(text, lambda name: name in reg)
    return ModuleSpec(family, reg.get(family).source_kwargs(source))


def has_decoder(family: str) -> bool:
    """Whether ``family`` registers a decoder under its own name."""
    return family in DECODERS


def token_space(spec: ModuleSpec) -> TokenSpace:
    """The token space of an encoder spec, from its config alone where the family can."""
    return ENCODERS.get(spec.name).token_space(**spec.kwargs)


def visual_space(cfg: ModelConfig, space: TokenSpace | None = None) -> TokenSpace:
    """What the LLM sees of an image under ``cfg``: the encoder's token space (``space``, else told
    from its config) truncated to ``cfg.num_visual_tokens`` (``cfg.token_select`` picks which)."""
    space = space or token_space(cfg.encoder)
    return space.truncated(cfg.num_visual_tokens, cfg.token_select)


def cannot_paint(cfg: ModelConfig, space: TokenSpace | None = None) -> str | None:
    """Why a model of ``cfg`` cannot answer with images (``None``: it can): it keeps only some of
    each image's tokens (``num_visual_tokens``), or it has no decoder."""
    space = space or token_space(cfg.encoder)
    if visual_space(cfg, space).of is not None:
        return (f"--num-visual-tokens {cfg.num_visual_tokens} keeps {cfg.num_visual_tokens} of the "
                f"{space.num_tokens} tokens of encoder {cfg.encoder.name}, and a truncated model cannot paint "
                "(text answers only)")
    if cfg.decoder is None:
        return ("the model has no vision decoder (--decoder none, or an encoder family that cannot paint): "
                "it answers in text only; give --decoder FAMILY:SOURCE")
    return None


def check_adapters(adapter: str, deadapter: str, kind: str, encoder: str = "") -> None:
    """One-line ``ConfigError`` unless the adapters' declarations (:func:`.adapters.declare_adapter`)
    allow ``adapter`` as the input adapter of ``kind`` tokens and ``deadapter`` as the output one."""
    for name, role, flag in ((adapter, ADAPTER, "--adapter"), (deadapter, DEADAPTER, "--deadapter")):
        if not ADAPTERS.knows(name) and ":" not in name:  # unknown: list the ones that serve this role
            fit = [n for n in ADAPTERS if role in adapter_traits(ADAPTERS.get(n)).roles
                   and (role == DEADAPTER or kind in adapter_traits(ADAPTERS.get(n)).accepts)]
            raise ConfigError(f"unknown {flag} {name!r}; valid here: {', '.join(fit)}, or a package.module:function "
                              "of your own")
    fa, fd = ADAPTERS.get(adapter), ADAPTERS.get(deadapter)
    ta, td = adapter_traits(fa), adapter_traits(fd)
    if ADAPTER not in ta.roles:
        raise ConfigError(f"--adapter {adapter} serves only as --deadapter; give it as --deadapter and "
                          f"pick an --adapter for {kind}")
    if kind not in ta.accepts:
        takes = " or ".join(ta.accepts) or "no tokens"
        want = [n for n in ADAPTERS if ADAPTER in adapter_traits(ADAPTERS.get(n)).roles
                and kind in adapter_traits(ADAPTERS.get(n)).accepts]
        of = f" of encoder {encoder}" if encoder else ""
        raise ConfigError(f"--adapter {adapter} does not take {kind}{of} (it takes {takes}); "
                          f"use {' | '.join(want) or 'an adapter that accepts ' + kind}")
    if DEADAPTER not in td.roles:
        raise ConfigError(f"--deadapter {deadapter} serves only as --adapter; use e.g. --deadapter linear")
    if td.inverts and fa not in [ADAPTERS.get(n) for n in td.inverts]:
        raise ConfigError(f"--deadapter {deadapter} inverts the input adapter and needs --adapter "
                          f"{' | '.join(td.inverts)}, got {adapter}")


def complete_config(cfg: ModelConfig, space: TokenSpace | None = None) -> ModelConfig:
    """Fill what follows from the family (adapters, loss) where ``cfg`` leaves it open, and check
    that the parts fit together; returns ``cfg`` (changed in place), so a run records what it uses.
    A truncated model (``num_visual_tokens``) cannot paint: it keeps no decoder."""
    space = space or token_space(cfg.encoder)
    if cfg.decoder is not None and visual_space(cfg, space).of is not None:
        cfg.decoder = None
    if cfg.adapter is None:
        cfg.adapter = ModuleSpec(space.default_adapter)
    if cfg.deadapter is None:
        cfg.deadapter = ModuleSpec("linear")
    if cfg.vision_loss is None:
        cfg.vision_loss = space.default_loss
    check_adapters(cfg.adapter.name, cfg.deadapter.name, space.kind, cfg.encoder.name)
    loss = vision_loss(cfg.vision_loss)
    if loss.tokens != space.kind:
        raise ConfigError(f"--vision-loss {loss.name} compares {loss.tokens} but encoder {cfg.encoder.name} "
                          f"gives {space.kind}; use {space.default_loss}")
    if loss.uses_decoder and cfg.decoder is None:
        raise ConfigError(f"--vision-loss {loss.name} decodes predictions but the model has no decoder")
    if loss.uses_decoder and not DECODERS.get(cfg.decoder.name).differentiable:
        raise ConfigError(f"--vision-loss {loss.name} trains through the decoder, but decoder {cfg.decoder.name} "
                          "passes no gradient; use feature_mse")
    if cfg.train_decoder and cfg.decoder is None:
        raise ConfigError("--train-decoder needs a decoder (--decoder FAMILY:SOURCE)")
    return cfg


__all__ = ["VisionEncoder", "VisionDecoder", "TokenSpace", "PlanShape", "VisionLoss", "FEATURES", "CODES",
           "build_encoder", "build_decoder", "build_adapter", "meta_part", "token_space", "visual_space", "vision_loss",
           "complete_config", "cannot_paint", "parse_part", "has_decoder", "check_adapters", "declare_adapter",
           "adapter_traits", "AdapterTraits", "ADAPTER", "DEADAPTER"]
