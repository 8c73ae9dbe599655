"""Training figures: the loss curves (``loss.png``) and preview grids of images."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..util.fsutil import atomic_path
from ..image.io import save_png

LOSS_COLUMNS = ("loss", "text_loss", "vision_loss")


def plot_metrics(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Plot every loss column of ``metrics.csv`` against the step (log scale when positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    cols = [c for c in rows[0] if c.endswith("loss") or c in LOSS_COLUMNS]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    positive = True
    for c in cols:
        ys = [float(r[c]) for r in rows]
        if max(ys) == 0 and c != "loss":
            continue  # a loss this data does not use (e.g. text_loss of image-only data)
        positive &= min(ys) > 0
        ax.plot(steps, ys, label=c, linewidth=1.2)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def image_grid(rows: Sequence[Sequence[np.ndarray | None]], pad: int = 2) -> np.ndarray:
    """HxWx3 uint8 tiles (``None`` = grey) → one uint8 image, rows × columns, ``pad`` px apart."""
    tiles = [t for r in rows for t in r if t is not None]
    if not tiles:
        raise ValueError("no tiles to draw")
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            if t is None:
                out[y:y + h, x:x + w] = 128
            else:
                out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def save_grid(rows: Sequence[Sequence[np.ndarray | None]], path: str | os.PathLike, scale: int = 1) -> None:
    grid = image_grid(rows)
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
