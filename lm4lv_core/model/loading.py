"""How the frozen parts are loaded: in the run's compute dtype from the first byte, with a chosen
attention implementation; trainable parameters keep float32 master weights.

``precision`` (``fp32`` | ``bf16`` | ``fp16``) names the compute dtype. Frozen weights (the LLM, a
frozen encoder or decoder) are read from disk directly in it (``from_pretrained(dtype=...)``;
transformers v5 always builds the model on the meta device first, so no float32 copy is ever
made). Trainable weights are kept in ``trainable_dtype`` (float32 when training), so the
optimizer's states and updates are float32 whatever the engine.
"""

from __future__ import annotations

import importlib.util

import torch

from ..defaults import ATTN_IMPLEMENTATIONS
from ..errors import ConfigError



def check_attn_implementation(name: str, *, dtype: torch.dtype | None = None, cuda: bool | None = None) -> None:
    """One-line errors for an attention implementation this machine or run cannot use."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("--attn-implementation flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn), which is not installed; use auto")
    if cuda is None:
        from ..util.dist import has_cuda

        cuda = has_cuda()
    if not cuda:
        raise ConfigError("--attn-implementation flash_attention_2 needs a CUDA GPU; this machine runs on "
                          "the CPU, use auto")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise ConfigError(f"--attn-implementation flash_attention_2 needs an Ampere or newer GPU (compute "
                          f"capability >= 8.0), this one is {major}.{minor}; use auto")
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError("--attn-implementation flash_attention_2 needs --precision bf16 or fp16")
