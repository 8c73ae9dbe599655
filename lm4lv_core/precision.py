"""The one precision table: each ``--precision`` name with its torch dtype, its bytes per element,
and how DeepSpeed and accelerate spell it.

Importing this module does not import torch (the command line reads the names)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str               # --precision value
    dtype_name: str         # torch dtype name
    bytes: int              # bytes per element
    deepspeed: dict | None  # DeepSpeed config section enabling it (None: fp32)
    accelerate: str         # accelerate's mixed_precision value
    loss_scaled: bool = False  # a dynamic loss scaler skips steps whose gradients overflow

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def mixed(self) -> bool:
        """Whether the compute dtype is lower than the float32 master weights."""
        return self.bytes < 4


FP32 = "fp32"
PRECISIONS: dict[str, Precision] = {
    FP32: Precision(FP32, "float32", 4, None, "no"),
    "bf16": Precision("bf16", "bfloat16", 2, {"bf16": {"enabled": True}}, "bf16"),
    "fp16": Precision("fp16", "float16", 2, {"fp16": {"enabled": True, "initial_scale_power": 16}}, "fp16",
                      loss_scaled=True),
}


def precision(name: str) -> Precision:
    """The table row of ``name``; an unknown name is a one-line ``ConfigError``."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def compute_dtype(name: str):
    """The torch dtype of ``--precision name``."""
    return precision(name).dtype


def cast_by_trainability(module, frozen, trainable) -> None:
    """Floating parameters that train become ``trainable`` (the master copy), the others ``frozen``.
    Buffers keep their dtype (e.g. rotary frequencies, pixel statistics stay float32)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            want = trainable if p.requires_grad else frozen
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)

