"""Activation checkpointing of transformer layers (``--gradient-checkpointing``).

Each layer's forward runs under ``torch.utils.checkpoint`` (non-reentrant) whenever gradients are
recorded: only the layer inputs are kept and the layer is recomputed in the backward pass. It works
whether the module is in train or eval mode (a frozen LLM runs in eval mode, and Hugging Face's own
checkpointing is active only in training mode), with inputs that carry gradient (``inputs_embeds``
from the adapter), with LoRA, ZeRO 0–3 and accelerate. Without gradients (generation, frozen
encoder under ``no_grad``) and with a KV cache the layer runs as is.

The wrapper is an instance attribute ``forward``: parameter names and state dicts do not change.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError

_MARK = "_lm4lv_checkpointed"
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled() or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def transformer_layers(module: nn.Module) -> list[nn.Module]:
    """The outermost transformer layers of ``module``: Hugging Face ``GradientCheckpointingLayer``
    instances, else the classes a model lists in ``_no_split_modules``."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in module.modules():
        if id(m) in inside:
            continue
        if (GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)) or type(m).__name__ in names:
            found.append(m)
            inside.update(id(s) for s in m.modules())
    return found


def checkpoint_layers(module: nn.Module, what: str = "model") -> int:
    """Checkpoint every transformer layer of ``module``; returns how many layers that is."""
    layers = transformer_layers(module)
    if not layers:
        raise ConfigError(f"--gradient-checkpointing: no transformer layers found in the {what} "
                          f"({type(module).__name__})")
    for layer in layers:
        if not getattr(layer, _MARK, False):
            layer.forward = types.MethodType(_checkpointed_forward, layer)
            setattr(layer, _MARK, True)
    return len(layers)


def is_checkpointed(layer: nn.Module) -> bool:
    return bool(getattr(layer, _MARK, False))
