"""How the LLM is loaded (:func:`load_llm`): in the run's compute dtype from the first byte, with a
chosen attention implementation (:func:`check_attn_implementation`); ``LM4LV.from_config`` loads the
vision parts the same way and keeps float32 master weights for trainable parameters.

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


def load_llm(path: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """Any Hugging Face causal LM folder and its tokenizer, its weights read in ``dtype`` (default
    float32; never the checkpoint's own dtype, which transformers v5 would pick by default), with
    ``attn_implementation`` (``auto`` or ``None``: what transformers picks for the family)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .families import llm_config, resolve_attn_implementation

    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation:
        check_attn_implementation(attn_implementation, dtype=kwargs["dtype"])
        kwargs["attn_implementation"] = resolve_attn_implementation(attn_implementation, llm_config(path),
                                                                    f" in {path}")
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"{path}: cannot load a causal LM folder ({e})") from None
    return llm, tokenizer
