"""Reading and writing images: 8-bit RGB in, PNG out (atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import LM4LVError
from .fsutil import atomic_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any supported image as 8-bit RGB.

    EXIF orientation is applied; grayscale, RGBA (composited on black is *not* done: alpha is
    dropped), palette and 16-bit images are converted to 8-bit RGB.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if arr.max() > 255 else 255.0
                arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
                im = Image.fromarray(arr, mode="L")
            if im.mode == "P":
                im = im.convert("RGBA")
            return im.convert("RGB")
    except FileNotFoundError:
        raise LM4LVError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LM4LVError(f"{path}: cannot read image ({e})") from None


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike) -> None:
    """Write a PNG atomically (temp file + rename). Arrays must be HxWx3 uint8."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def list_images(root: str | os.PathLike) -> list[Path]:
    """All supported images under ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
