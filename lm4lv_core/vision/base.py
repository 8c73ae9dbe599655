"""The vision-family interface: what the LLM sees of an image, and the parts that make and read it.

A vision family (MAE, VQGAN, SD-VAE, BEiT + dVAE, CLIP, ...) is a registered encoder and, when it
can paint, a registered decoder. Everything the rest of lm4lv needs to know about a family is
asked here, never decided by comparing its name:

* :class:`TokenSpace`: how an image becomes tokens (float features ``[B, N, d]`` or integer codes
  ``[B, N]`` of a codebook of K), how many at which image size, the default input adapter
  (linear / embedding), prediction head (features, or logits over K) and loss, and how a
  prediction becomes the next input during generation;
* :class:`VisionEncoder` / :class:`VisionDecoder`: images → tokens → images, each able to tell
  its token space from its config alone (``token_space``) and to build itself on the meta device
  with the shape the memory plan needs (``meta`` and ``plan_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from ..defaults import TOKEN_SELECT
from ..util.optional import require  # noqa: F401  (families import it from here)

FEATURES, CODES = "features", "codes"


def preprocessor_config(folder: str | None) -> dict:
    """A checkpoint folder's ``preprocessor_config.json`` (empty when it has none)."""
    import json
    from pathlib import Path

    f = Path(folder) / "preprocessor_config.json" if folder else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else {}


def checkpoint_stats(folder: str | None, default: tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)``: the checkpoint's own ``image_mean`` / ``image_std`` where its folder has a
    preprocessor config, else ``default`` (the family's published statistics, :mod:`.constants`)."""
    pre = preprocessor_config(folder)
    return tuple(pre.get("image_mean") or default[0]), tuple(pre.get("image_std") or default[1])


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """Pixels in [0, 1] → ``(x - mean) / std`` in float32 (statistics never rounded to bf16)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() - m) / s


@dataclass(frozen=True)
class TokenSpace:
    """The visual tokens of one image.

    ``codebook_size`` ``None``: float features ``[B, N, dim]``; ``K``: integer codes ``[B, N]`` in
    ``[0, K)`` (``dim`` is then the width of a codebook entry, for information only).
    """

    num_tokens: int
    dim: int
    image_size: int
    codebook_size: int | None = None
    of: int | None = None       # truncated: the encoder's own token count the kept ones come from
    select: str = "first"       # truncated: which ones are kept (see :data:`TOKEN_SELECT`)

    @property
    def kind(self) -> str:
        return CODES if self.codebook_size else FEATURES

    @property
    def in_dim(self) -> int:
        """Width of the adapter's input: the feature width, or the codebook size (embedding)."""
        return self.codebook_size or self.dim

    @property
    def out_dim(self) -> int:
        """Width of the deadapter's output (the prediction): a feature, or logits over the codebook."""
        return self.codebook_size or self.dim

    @property
    def default_adapter(self) -> str:
        return "embedding" if self.codebook_size else "linear"

    @property
    def default_loss(self) -> str:
        return "code_ce" if self.codebook_size else "feature_mse"

    def truncated(self, n: int | None, select: str = "first") -> "TokenSpace":
        """``n`` of each image's tokens (``None``: all): the first ``n`` (local), or ``n`` spread
        evenly over all of them (``strided``; the first and the last kept)."""
        if select not in TOKEN_SELECT:
            raise ValueError(f"token selection must be one of {', '.join(TOKEN_SELECT)}, got {select!r}")
        if not n or n >= self.num_tokens:
            return self
        return replace(self, num_tokens=n, of=self.num_tokens, select=select)

    def indices(self) -> list[int] | None:
        """The kept tokens' positions among the encoder's (``None``: a leading run or all)."""
        if self.of is None or self.select == "first":
            return None
        if self.num_tokens == 1:
            return [0]
        step = (self.of - 1) / (self.num_tokens - 1)
        return [round(i * step) for i in range(self.num_tokens)]

    def take(self, tokens: torch.Tensor) -> torch.Tensor:
        """The kept tokens of the encoder's ``[B, N_enc(, d)]``."""
        idx = self.indices()
        if idx is None:
            return tokens[:, : self.num_tokens]
        return tokens[:, torch.tensor(idx, device=tokens.device)]

    def adapter_input(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Tokens as the adapter takes them: features in the adapter's dtype, codes as int64."""
        return tokens.long() if self.codebook_size else tokens.to(dtype)

    def next_token(self, head: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A prediction ``[R, out_dim]`` → the token fed back next: the feature itself, or the
        code ``pick(logits)`` chooses (argmax or a sample)."""
        return pick(head.float()) if self.codebook_size else head

    def empty(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed buffer for ``batch`` images of tokens (features in ``dtype`` or int64 codes)."""
        if self.codebook_size:
            return torch.zeros(batch, self.num_tokens, dtype=torch.long, device=device)
        return torch.zeros(batch, self.num_tokens, self.dim, dtype=dtype, device=device)

    def check(self, tokens: torch.Tensor, what: str) -> None:
        """One-line error for tokens of the wrong kind or range (codes outside ``[0, K)``)."""
        if self.codebook_size:
            if tokens.is_floating_point():
                raise ValueError(f"{what}: expected integer codes, got {tokens.dtype}")
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
                raise ValueError(f"{what}: codes must lie in [0, {self.codebook_size}), got "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")
        elif not tokens.is_floating_point():
            raise ValueError(f"{what}: expected float features, got {tokens.dtype}")


@dataclass(frozen=True)
class PlanShape:
    """What the memory plan needs of a transformer-like vision part: token width, layer count
    and MLP width over ``tokens`` positions (zeros: a part the plan only counts by weights)."""

    dim: int = 0
    layers: int = 0
    intermediate: int = 0
    tokens: int = 0
    forward_elements: int = 0  # convolutional parts: elements live at once in a no-grad forward, per image


def conv_plan_shape(cfg: dict, image_size: int) -> PlanShape:
    """The plan shape of a diffusers convolutional autoencoder half: its no-grad forward peaks at
    the full-resolution level, about five maps of the first level's width live at once (block
    input and output, GroupNorm and SiLU temporaries) — measured within 25 % at tiny width."""
    return PlanShape(forward_elements=5 * int(cfg["block_out_channels"][0]) * image_size ** 2)


class VisionPart(nn.Module):
    """What encoders and decoders share: their token space and plan shape."""

    dim: int
    num_tokens: int
    image_size: int
    codebook_size: int | None = None

    @property
    def space(self) -> TokenSpace:
        """The part's token space, from the attributes a family sets (``dim``, ``num_tokens``,
        ``image_size``, ``codebook_size``)."""
        return TokenSpace(self.num_tokens, self.dim, self.image_size, self.codebook_size)

    @classmethod
    def source_kwargs(cls, source: str) -> dict:
        """Constructor keywords of ``FAMILY:SOURCE`` (default: SOURCE is a folder or hub id, ``path``)."""
        return {"path": source} if source else {}

    @classmethod
    def token_space(cls, **kwargs) -> TokenSpace:
        """The token space from the part's config alone (no weights read). Default: build it."""
        return cls(**kwargs).space

    @classmethod
    def meta(cls, **kwargs) -> "VisionPart":
        """The part with its parameters on the meta device (configs only), for the memory plan.
        Default: build it normally (small parts)."""
        return cls(**kwargs)

    def plan_shape(self) -> PlanShape:
        """Activation shape for the memory plan (default: weights only)."""
        return PlanShape()


class VisionEncoder(VisionPart):
    """Images ``[B, 3, H, W]`` in [0, 1] → tokens: features ``[B, N, dim]`` or codes ``[B, N]``."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class VisionDecoder(VisionPart):
    """Tokens (features ``[B, N, dim]`` or codes ``[B, N]``) → images ``[B, 3, H', W']`` in [0, 1].

    ``clamp=False`` keeps gradients for pixels outside [0, 1] (pixel losses); a decoder that
    passes no gradient (``differentiable = False``, e.g. through an argmax) cannot serve them."""

    differentiable = True

    def forward(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
