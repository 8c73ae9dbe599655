"""Adapters between the visual tokens and the LLM embedding space (d_llm), registered by name.

Every adapter is built as ``fn(in_dim, out_dim, **kwargs)``: the adapter maps the token space's
``in_dim`` (a feature width, or the codebook size for codes) to d_llm, the deadapter maps d_llm to
its ``out_dim`` (a feature, or logits over the codebook). ``pseudo_inverse`` deadapters are also
given the adapter they invert (``partner``).

Each adapter declares what it can do with :func:`declare_adapter` (an attribute on the function,
read back by :func:`adapter_traits`): the token kinds it reads as the input adapter (features,
codes), the roles it can play (adapter, deadapter or both) and, for a deadapter built from the
adapter it inverts, which adapters it can invert. ``complete_config`` checks a model's choice
against these declarations. An adapter that declares nothing (e.g. a user's own registered one)
reads features and plays both roles::

    @ADAPTERS.register("my_adapter")
    @declare_adapter(accepts=(FEATURES, CODES), roles=(ADAPTER,))
    def my_adapter(in_dim, out_dim): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import ADAPTERS
from .base import CODES, FEATURES

ADAPTER, DEADAPTER = "adapter", "deadapter"  # the two roles: visual tokens → d_llm, d_llm → the head
ROLES = (ADAPTER, DEADAPTER)
TOKEN_KINDS = (FEATURES, CODES)


@dataclass(frozen=True)
class AdapterTraits:
    """What a registered adapter can do (see :func:`declare_adapter`)."""

    accepts: tuple[str, ...] = (FEATURES,)  # token kinds it reads as the input adapter
    roles: tuple[str, ...] = ROLES           # adapter, deadapter or both
    inverts: tuple[str, ...] = ()            # a deadapter given ``partner``: the adapters it inverts (empty: any)


DEFAULT_TRAITS = AdapterTraits()


def declare_adapter(*, accepts: tuple[str, ...] = (FEATURES,), roles: tuple[str, ...] = ROLES,
                    inverts: tuple[str, ...] = ()) -> Callable:
    """Decorator recording an adapter's :class:`AdapterTraits` on its function (``fn.adapter_traits``);
    put it under ``@ADAPTERS.register(...)`` or over it, the function is returned unchanged."""
    accepts, roles, inverts = ((v,) if isinstance(v, str) else tuple(v) for v in (accepts, roles, inverts))
    bad = [k for k in accepts if k not in TOKEN_KINDS] + [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"declare_adapter: accepts takes {', '.join(TOKEN_KINDS)} and roles takes "
                         f"{', '.join(ROLES)} (at least one); got {bad or 'no role'}")
    traits = AdapterTraits(accepts, roles, inverts)

    def deco(fn: Callable) -> Callable:
        fn.adapter_traits = traits
        return fn

    return deco


def adapter_traits(fn: Callable) -> AdapterTraits:
    """The declared traits of an adapter function (:data:`DEFAULT_TRAITS` when it declares none)."""
    traits = getattr(fn, "adapter_traits", None)
    return traits if isinstance(traits, AdapterTraits) else DEFAULT_TRAITS


@ADAPTERS.register("linear")
@declare_adapter(accepts=(FEATURES,), roles=ROLES)
def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """One linear map, as in LM4LV (the adapter d_v→d_llm and the deadapter d_llm→d_v)."""
    return nn.Linear(in_dim, out_dim, bias=bias)


@ADAPTERS.register("mlp")
@declare_adapter(accepts=(FEATURES,), roles=ROLES)
def mlp(in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """Two linear layers with GELU, for experiments beyond the linear baseline."""
    hidden = hidden or max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@ADAPTERS.register("lowrank", aliases=("low_rank",))
@declare_adapter(accepts=(FEATURES,), roles=ROLES)
def lowrank(in_dim: int, out_dim: int, rank: int = 64, bias: bool = True) -> nn.Module:
    """A linear map of rank ``rank`` (two factors), fewer parameters than ``linear``."""
    if rank <= 0:
        raise ConfigError(f"lowrank adapter: rank must be > 0, got {rank}")
    return nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim, bias=bias))


@ADAPTERS.register("embedding")
@declare_adapter(accepts=(CODES,), roles=(ADAPTER,))
def embedding(in_dim: int, out_dim: int) -> nn.Module:
    """Integer codes of a codebook of ``in_dim`` entries → learnt embeddings (discrete families)."""
    return nn.Embedding(in_dim, out_dim)


@ADAPTERS.register("identity")
@declare_adapter(accepts=(FEATURES,), roles=ROLES)
def identity(in_dim: int, out_dim: int) -> nn.Module:
    """No map: the visual width must equal the LLM's."""
    if in_dim != out_dim:
        raise ConfigError(f"identity adapter needs equal widths, got {in_dim} → {out_dim}; use linear")
    return nn.Identity()


class PseudoInverse(nn.Module):
    """A deadapter tied to a linear adapter ``y = W x + b``: ``x̂ = pinv(W) (h − b)``. It owns no
    weights; gradients flow into the adapter."""

    def __init__(self, partner: nn.Module) -> None:
        super().__init__()
        if not isinstance(partner, nn.Linear):
            raise ConfigError("pseudo_inverse deadapter needs a linear adapter")
        object.__setattr__(self, "_partner", partner)  # not a submodule: the adapter owns it

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self._partner
        if a.bias is not None:
            h = h - a.bias
        pinv = torch.linalg.pinv(a.weight.float())  # [in, out]
        return (h.float() @ pinv.T).to(h.dtype)


@ADAPTERS.register("pseudo_inverse", aliases=("pinv",))
@declare_adapter(accepts=(), roles=(DEADAPTER,), inverts=("linear",))
def pseudo_inverse(in_dim: int, out_dim: int, partner: nn.Module | None = None) -> nn.Module:
    """Deadapter only: the adapter's pseudo-inverse (see :class:`PseudoInverse`)."""
    if partner is None:
        raise ConfigError("pseudo_inverse is a deadapter (it inverts the adapter); use it as --deadapter")
    return PseudoInverse(partner)
