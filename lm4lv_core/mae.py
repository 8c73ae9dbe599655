"""MAE autoencoder: decoder fine-tuning (|x − D(E(x))|₁ + λ·LPIPS) and batch reconstruction.

The MAE runs with mask ratio 0 and patch order kept, exactly as inside LM4LV, so a decoder
fine-tuned here is the decoder LM4LV uses (``--mae-decoder``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.dataset import image_to_tensor, tensor_to_uint8
from .errors import LM4LVError
from .imageio import list_images, load_rgb, save_png
from .vision.mae import MAEDecoder, MAEEncoder, load_mae


class MAEAutoencoder(nn.Module):
    """Encoder + decoder of one ``ViTMAEForPreTraining``; only the decoder trains by default."""

    def __init__(self, path: str, train_encoder: bool = False) -> None:
        super().__init__()
        hf = load_mae(path)
        object.__setattr__(self, "_hf", hf)  # not a submodule: its parts are registered below
        self.encoder = MAEEncoder(mae=hf)
        self.decoder = MAEDecoder(mae=hf)
        self.image_size = self.encoder.image_size
        self.train_encoder = train_encoder
        for p in self.encoder.parameters():
            p.requires_grad_(train_encoder)
        for p in self.decoder.parameters():
            p.requires_grad_(True)

    def forward(self, pixels: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → reconstruction ``[B, 3, H, W]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            feats = self.encoder(pixels)
        return self.decoder(feats, clamp=clamp)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a complete Hugging Face ``ViTMAEForPreTraining`` folder (atomically)."""
        if state_dict is not None:
            self.load_state_dict(state_dict, strict=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            self._hf.save_pretrained(str(tmp))
            if path.exists():
                shutil.rmtree(path)  # only ever an earlier save of this same folder
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def reconstruct_folder(mae_path: str, images_dir: str | Path, out_dir: str | Path, *,
                       batch_size: int = 8, rank: int = 0, world_size: int = 1,
                       crop_border: int = 4, progress=None) -> list[dict[str, Any]]:
    """Reconstruct every image under ``images_dir`` (this rank's share) into ``out_dir`` under the
    same relative names (``.png``); return per-image PSNR/SSIM rows against the (resized) input."""
    from .metrics import psnr, ssim

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    files = list_images(images_dir)
    if not files:
        raise LM4LVError(f"{images_dir}: no images found (png/jpg/jpeg/webp/bmp/tiff)")
    model = MAEAutoencoder(mae_path).eval()
    mine = files[rank::world_size]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        x = torch.stack([image_to_tensor(load_rgb(f), model.image_size) for f in chunk])
        with torch.inference_mode():
            y = model(x)
        for f, xi, yi in zip(chunk, x, y):
            rel = f.relative_to(images_dir).with_suffix(".png")
            src, rec = tensor_to_uint8(xi), tensor_to_uint8(yi)
            save_png(rec, out_dir / rel)
            rows.append({"name": rel.as_posix(), "psnr": psnr(src, rec, crop_border),
                         "ssim": ssim(src, rec, crop_border)})
        if progress:
            progress(len(chunk))
    return rows


def mean_rows(rows: list[dict[str, Any]], keys=("psnr", "ssim")) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}
