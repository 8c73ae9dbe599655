"""Training figures: the loss curves (``loss.png``; preview grids: ``image/grids.py``)."""

from __future__ import annotations

import csv
import os

from ..util.fsutil import atomic_path

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

