"""Adapters between the vision feature space (d_v) and the LLM embedding space (d_llm)."""

from __future__ import annotations

from torch import nn

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
