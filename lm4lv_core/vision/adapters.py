"""Adapters between the visual tokens and the LLM embedding space (d_llm), registered by name.

Every adapter is built as ``fn(in_dim, out_dim, **kwargs)``: the adapter maps the token space's
``in_dim`` (a feature width, or the codebook size for codes) to d_llm, the deadapter maps d_llm to
its ``head_dim`` (a feature, or logits over the codebook). ``pseudo_inverse`` deadapters are also
given the adapter they invert (``partner``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import ADAPTERS


@ADAPTERS.register("linear")
def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """One linear map, as in LM4LV (the adapter d_v→d_llm and the deadapter d_llm→d_v)."""
    return nn.Linear(in_dim, out_dim, bias=bias)


@ADAPTERS.register("mlp")
def mlp(in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """Two linear layers with GELU, for experiments beyond the linear baseline."""
    hidden = hidden or max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@ADAPTERS.register("lowrank", aliases=("low_rank",))
def lowrank(in_dim: int, out_dim: int, rank: int = 64, bias: bool = True) -> nn.Module:
    """A linear map of rank ``rank`` (two factors), fewer parameters than ``linear``."""
    if rank <= 0:
        raise ConfigError(f"lowrank adapter: rank must be > 0, got {rank}")
    return nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim, bias=bias))


@ADAPTERS.register("embedding")
def embedding(in_dim: int, out_dim: int) -> nn.Module:
    """Integer codes of a codebook of ``in_dim`` entries → learnt embeddings (discrete families)."""
    return nn.Embedding(in_dim, out_dim)


@ADAPTERS.register("identity")
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
def pseudo_inverse(in_dim: int, out_dim: int, partner: nn.Module | None = None) -> nn.Module:
    """Deadapter only: the adapter's pseudo-inverse (see :class:`PseudoInverse`)."""
    if partner is None:
        raise ConfigError("pseudo_inverse is a deadapter (it inverts the adapter); use it as --deadapter")
    return PseudoInverse(partner)
