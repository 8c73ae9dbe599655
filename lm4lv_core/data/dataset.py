"""Dataset and batching: encoded sequences plus the pixels of every image they reference."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, LM4LVError
from ..image.io import check_resize, load_rgb, to_square
from .format import Sample
from .sequence import IGNORE_INDEX, SLOT_IMAGE, SLOT_QUERY, SLOT_TEXT, Encoded, SequenceBuilder


def image_to_tensor(img: Image.Image, size: int, resize: str = "stretch") -> torch.Tensor:
    """PIL RGB → ``[3, size, size]`` float in [0, 1].

    Images of another size are brought to ``size`` x ``size`` by the size policy ``resize``
    (:func:`lm4lv_core.image.io.to_square`): ``stretch`` (the reference's) or ``crop``.
    """
    arr = np.asarray(to_square(img, size, resize), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] → ``[H, W, 3]`` uint8."""
    return (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@dataclass
class Item:
    sample: Sample
    encoded: Encoded
    pixels: torch.Tensor  # [n_images, 3, H, W]


class LM4LVDataset(torch.utils.data.Dataset):
    """Encodes samples on the fly; images are loaded and resized to the encoder's size (size
    policy ``resize``: ``stretch`` or ``crop``). ``image_only`` / ``query``: see ``SequenceBuilder.encode``."""

    def __init__(self, samples: Sequence[Sample], builder: SequenceBuilder, image_size: int, *,
                 generation: bool = False, image_only: bool = False, query: bool = False,
                 loader: Callable[[str], Image.Image] = load_rgb, resize: str = "stretch"):
        self.samples = list(samples)
        self.builder = builder
        self.image_size = image_size
        self.generation = generation
        self.image_only = image_only
        self.query = query
        self.loader = loader
        self.resize = check_resize(resize)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Item:
        s = self.samples[i]
        enc = self.builder.encode(s, generation=self.generation, image_only=self.image_only, query=self.query)
        if s.images:
            pixels = torch.stack([image_to_tensor(self.load(s, p), self.image_size, self.resize) for p in s.images])
        else:
            pixels = torch.zeros(0, 3, self.image_size, self.image_size)
        return Item(s, enc, pixels)

    def load(self, s: Sample, path: str) -> Image.Image:
        """One image of sample ``s``; an unreadable one is a ``DataError`` naming the sample too."""
        try:
            return self.loader(path)
        except DataError:
            raise
        except LM4LVError as e:
            raise DataError(f"sample {s.index}: {e}") from None


class _Carried:
    """An lm4lv error raised in a data-loader process, handed back as the batch."""

    def __init__(self, error: LM4LVError) -> None:
        self.error = error


class CarryErrors(torch.utils.data.Dataset):
    """``dataset`` whose items are lm4lv errors instead of raising them: a loader process would
    wrap one in its own multi-line report. With :func:`carrying_errors` and :func:`raise_carried`
    the training process raises the original error (one line naming the file and sample)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except LM4LVError as e:
            return _Carried(e)


def carrying_errors(collate: Callable) -> Callable:
    """``collate`` that passes a carried error on instead of a batch."""
    return functools.partial(_collate_carrying, collate)


def _collate_carrying(collate: Callable, items: list):
    failed = next((it for it in items if isinstance(it, _Carried)), None)
    return failed if failed is not None else collate(items)


def raise_carried(batch):
    """``batch``, or the error a loader process carried instead of it, raised."""
    if isinstance(batch, _Carried):
        raise batch.error
    return batch


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor    # [B, L]
    labels: torch.Tensor          # [B, L]
    slot_type: torch.Tensor       # [B, L]
    slot_image: torch.Tensor      # [B, L] index into ``pixels`` (batch-global) or -1
    slot_pos: torch.Tensor        # [B, L]
    target_mask: torch.Tensor     # [B, L] bool: target image slots (predicted from the position before)
    pixels: torch.Tensor          # [M, 3, H, W]
    image_is_target: torch.Tensor  # [M] bool
    sample_index: list[int] = field(default_factory=list)
    features: torch.Tensor | None = None  # [M, N, d_v] precomputed encoder features
    query_mask: torch.Tensor | None = None  # [B, L] bool: target query slots (predicted at the slot)

    def to(self, device, dtype: torch.dtype | None = None) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            out[f.name] = v
        return Batch(**out)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def collate(items: Sequence[Item], pad_id: int = 0, padding_side: str = "right") -> Batch:
    """Pad sequences (right for training, left for generation) and renumber images batch-wide."""
    L = max(len(it.encoded) for it in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    stype = torch.full((B, L), SLOT_TEXT, dtype=torch.long)
    simg = torch.full((B, L), -1, dtype=torch.long)
    spos = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    offset = 0
    for b, it in enumerate(items):
        e = it.encoded
        n = len(e)
        sl = slice(L - n, L) if padding_side == "left" else slice(0, n)
        ids[b, sl] = e.input_ids
        labels[b, sl] = e.labels
        stype[b, sl] = e.slot_type
        simg[b, sl] = torch.where(e.slot_image >= 0, e.slot_image + offset, e.slot_image)
        spos[b, sl] = e.slot_pos
        mask[b, sl] = 1
        offset += it.pixels.shape[0]
    pixels = torch.cat([it.pixels for it in items]) if offset else items[0].pixels[:0]
    is_target = torch.cat([it.encoded.image_is_target for it in items]) if offset else torch.zeros(0, dtype=torch.bool)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    has_target = (simg >= 0) & is_target[simg.clamp(min=0)] if offset else torch.zeros_like(mask, dtype=torch.bool)
    return Batch(ids, mask, position_ids, labels, stype, simg, spos, (stype == SLOT_IMAGE) & has_target, pixels,
                 is_target, [it.sample.index for it in items], query_mask=(stype == SLOT_QUERY) & has_target)
