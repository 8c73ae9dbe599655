"""``lm4lv generate --compile``: the per-step decode of image-only batches under ``torch.compile``.

Image-only batches know their final length (prompt + N visual tokens), so their KV cache is a
preallocated ``StaticCache`` and every decode step has the same shapes: one input embedding per
sample, a fixed-size attention mask, the position ids and the cache updated in place. That step
(the LLM backbone) is compiled once per model; on a GPU in ``reduce-overhead`` mode (CUDA graphs),
on the CPU in the default mode. Cache lengths are rounded up to a multiple of ``LENGTH_STEP`` and
the cache of the last shape is reused (reset), so batches with other prompt lengths rarely
recompile. The prefill and text-mode decoding run eagerly.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import ConfigError
from ..util.params import parameter_device

LENGTH_STEP = 64
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledDecode]" = weakref.WeakKeyDictionary()


def check_compile_available(device: torch.device) -> None:
    """One-line error when ``torch.compile`` cannot build code for ``device`` here."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure to find a compiler means the same
            raise ConfigError(f"--compile needs a C++ compiler (g++ or clang++, or $CXX) for torch.compile on "
                              f"the CPU; none works here ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ConfigError("--compile needs the triton package for torch.compile on a GPU") from None


def eager_step(backbone, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: ``emb`` ``[B, 1, d]`` → the last hidden state ``[B, d]``."""
    out = backbone(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return out.last_hidden_state[:, -1]


class CompiledDecode:
    """The compiled decode step of one model and the static cache it runs on."""

    def __init__(self, model) -> None:
        backbone = model.backbone()
        self.config = backbone.config
        device = parameter_device(backbone)
        check_compile_available(device)
        mode = "reduce-overhead" if device.type == "cuda" else None
        self._fn = torch.compile(lambda emb, mask, pos, cache: eager_step(backbone, emb, mask, pos, cache),
                                 mode=mode)
        self._cache = None
        self._key: tuple | None = None

    def cache_for(self, batch_size: int, length: int):
        """A zeroed ``StaticCache`` for ``batch_size`` samples of at least ``length`` positions."""
        from transformers import StaticCache

        length = -(-length // LENGTH_STEP) * LENGTH_STEP
        key = (batch_size, length)
        if key == self._key:
            self._cache.reset()
        else:
            self._cache, self._key = StaticCache(config=self.config, max_cache_len=length), key
        return self._cache

    def __call__(self, emb, mask, pos, cache) -> torch.Tensor:
        try:
            h = self._fn(emb, mask, pos, cache)
        except Exception as e:  # noqa: BLE001 - compiler failures have many types
            if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--compile: torch.compile failed on this machine ({first}); "
                                  "run without --compile") from None
            raise
        return h.clone()  # CUDA graphs reuse their output buffer at the next step


def compiled_decode(model) -> CompiledDecode:
    """The model's compiled decode step (built on first use, kept while the model lives)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledDecode(model)
    return _COMPILED[model]
