"""Experiment trackers beside ``metrics.csv``: ``--report-to tensorboard`` writes TensorBoard
event files under ``RUN/tensorboard`` (scalars ``train/<metric>`` for every ``metrics.csv`` column:
losses, ``lr``, ``samples_per_s``; images ``preview``: the preview grids).

TensorBoard is an optional extra (``pip install "lm4lv[tensorboard]"``); asking for it without the
package installed is an error before any worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

REPORTERS = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``"tensorboard"``, ``"none"`` or a comma list → the trackers to write (``none`` = only metrics.csv)."""
    items = value if isinstance(value, list) else str(value or "none").split(",")
    names = [s.strip().lower() for s in items if s and s.strip()]
    for n in names:
        if n not in REPORTERS:
            raise ConfigError(f"--report-to: unknown tracker {n!r}; valid: {', '.join(REPORTERS)}")
    return [n for n in dict.fromkeys(names) if n != "none"]


def check_available(names: list[str]) -> None:
    """Fail early, with the install command, when a tracker's package is missing."""
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError('--report-to tensorboard needs the tensorboard package: '
                              'pip install "lm4lv[tensorboard]" (or pip install tensorboard)') from None


class Reporter:
    """Writes one run's scalars and preview images to the chosen trackers (rank 0 only)."""

    def __init__(self, run_dir: str | Path, names: list[str], resume_step: int = 0) -> None:
        self.writer = None
        if "tensorboard" in names:
            check_available(names)
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged after its checkpoint (they are logged again)
            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar("train/" + k.replace("/", "_per_"), float(v), step)

    def image(self, png: str | Path, step: int, tag: str = "preview") -> None:
        if self.writer is None or not Path(png).is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
