"""Labelled comparison grids: column headers, a label per row, and PSNR / SSIM under each tile that
has a ground truth (drawn with Pillow's default font).

Used by the quickstart's ``grid.png``, the training previews and ``lm4lv eval --grid``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..defaults import CROP_BORDER
from ..errors import LM4LVError
from ..util.fsutil import atomic_path

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
EMPTY = (128, 128, 128)


def scores_caption(img: np.ndarray | None, truth: np.ndarray | None, crop_border: int = CROP_BORDER) -> str:
    """``PSNR 24.31 dB`` / ``SSIM 0.712`` of ``img`` against ``truth`` (the same protocol as
    ``lm4lv eval``); empty when there is nothing to compare or the sizes differ."""
    from .metrics import psnr, ssim

    if img is None or truth is None or img.shape != truth.shape:
        return ""
    lines = []
    for name, fn, fmt in (("PSNR", psnr, "{:.2f} dB"), ("SSIM", ssim, "{:.3f}")):
        try:
            lines.append(f"{name} " + fmt.format(fn(truth, img, crop_border)))
        except LM4LVError:  # too small for the crop / the SSIM window
            pass
    return "\n".join(lines)


def _font(tile_w: int):
    size = int(np.clip(tile_w // 9, 11, 16))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without the size argument: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return int(x1 - min(x0, 0)), int(y1 - min(y0, 0))


def comparison_grid(rows: Sequence[Sequence[np.ndarray | None]], columns: Sequence[str],
                    row_labels: Sequence[str], captions: Sequence[Sequence[str]] | None = None,
                    scale: int = 1, pad: int = 6) -> Image.Image:
    """One image: a header per column, a label left of each row, a caption under each tile.

    ``rows``: HxWx3 uint8 tiles (``None`` draws a grey tile); ``scale`` enlarges tiles (nearest)."""
    tiles = [t for r in rows for t in r if t is not None]
    if not tiles:
        raise ValueError("no tiles to draw")
    th = max(t.shape[0] for t in tiles) * scale
    tw = max(t.shape[1] for t in tiles) * scale
    ncol = max(len(r) for r in rows)
    columns = list(columns) + [""] * (ncol - len(columns))
    captions = captions or [[""] * len(r) for r in rows]
    font = _font(tw)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_w = max([tw] + [_text_size(measure, c, font)[0] for c in columns]
                + [_text_size(measure, c, font)[0] for r in captions for c in r])
    head_h = max(_text_size(measure, c, font)[1] for c in columns) if any(columns) else 0
    label_w = max([_text_size(measure, lab, font)[0] for lab in row_labels] + [0])
    cap_h = max([_text_size(measure, c, font)[1] for r in captions for c in r] + [0])
    row_h = th + (cap_h + pad if cap_h else 0)
    left = pad + (label_w + pad if label_w else 0)
    top = pad + (head_h + pad if head_h else 0)
    width = left + ncol * (col_w + pad)
    height = top + len(rows) * (row_h + pad)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        w, _ = _text_size(draw, name, font)
        draw.text((left + j * (col_w + pad) + (col_w - w) // 2, pad), name, fill=TEXT, font=font)
    for i, r in enumerate(rows):
        y = top + i * (row_h + pad)
        if i < len(row_labels) and row_labels[i]:
            _, h = _text_size(draw, row_labels[i], font)
            draw.multiline_text((pad, y + max(0, (th - h) // 2)), row_labels[i], fill=TEXT, font=font, spacing=2)
        for j, tile in enumerate(r):
            x = left + j * (col_w + pad) + (col_w - tw) // 2
            if tile is None:
                draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=EMPTY)
            else:
                img = Image.fromarray(np.ascontiguousarray(tile))
                if scale > 1:
                    img = img.resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.Resampling.NEAREST)
                canvas.paste(img, (x, y))
            cap = captions[i][j] if i < len(captions) and j < len(captions[i]) else ""
            if cap:
                w, _ = _text_size(draw, cap, font)
                draw.multiline_text((left + j * (col_w + pad) + (col_w - w) // 2, y + th + pad // 2), cap,
                                    fill=MUTED, font=font, spacing=2, align="center")
    return canvas


def save_comparison(rows: Sequence[Sequence[np.ndarray | None]], path: str | os.PathLike, columns: Sequence[str],
                    row_labels: Sequence[str], truth_column: int | None = -1, scale: int = 1,
                    crop_border: int = CROP_BORDER) -> None:
    """Write a labelled grid (PNG, atomically); tiles get PSNR / SSIM against the tile of
    ``truth_column`` in their row (``None``: no scores)."""
    captions = []
    for r in rows:
        truth = r[truth_column] if truth_column is not None and r else None
        captions.append(["" if truth_column is not None and j == truth_column % len(r)
                         else scores_caption(t, truth, crop_border) for j, t in enumerate(r)])
    grid = comparison_grid(rows, columns, row_labels, captions if truth_column is not None else None, scale)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG")


def grid_scale(size: int, target: int = 128) -> int:
    """Integer enlargement that shows ``size`` px tiles at about ``target`` px."""
    return max(1, target // max(1, size))
