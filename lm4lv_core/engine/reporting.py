"""Experiment trackers beside ``metrics.csv`` (``--report-to``, a comma list): each receives the
scalars ``train/<metric>`` for every ``metrics.csv`` column (losses, ``lr``, ``samples_per_s``) at
their step, and the preview grids as images ``preview``.

* ``tensorboard``: event files under ``RUN/tensorboard``.
* ``wandb``: a Weights & Biases run named after the run folder (``$WANDB_NAME`` overrides), in
  project ``lm4lv`` (``$WANDB_PROJECT`` overrides; ``$WANDB_ENTITY`` is honoured), with the
  run's resolved ``config.yaml`` as its config; its local files go to ``RUN/wandb``.
  ``WANDB_MODE=offline`` keeps the run there for a later ``wandb sync``. ``--resume`` continues
  the same W&B run (its id is kept in ``RUN/wandb/lm4lv-run-id``).

Each tracker is an optional extra (``pip install "lm4lv[tensorboard]"``, ``"lm4lv[wandb]"``);
asking for one without its package installed is an error before any worker starts.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

from ..defaults import RUN_CONFIG
from ..errors import ConfigError

REPORTERS = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_PROJECT = "lm4lv"
WANDB_RUN_ID = "lm4lv-run-id"  # in RUN/wandb: the W&B run a resumed run continues
# what each tracker writes into its folder (regular expressions of entry names; `--overwrite`
# removes only these): SummaryWriter's event files; W&B's run folders, the links to the latest
# run and its logs, its debug logs, and lm4lv's run id
TENSORBOARD_ENTRIES = r"events\.out\.tfevents\..+"
WANDB_ENTRIES = (r"(offline-)?run-\d{8}_\d{6}-[\w-]+|latest-run|debug(-internal|-core|-cli\..+)?\.log|"
                 + re.escape(WANDB_RUN_ID))
# tracker -> (module it needs, package and extra that install it)
_NEEDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``"tensorboard"``, ``"wandb"``, ``"none"`` or a comma list → the trackers to write
    (``none`` = only metrics.csv)."""
    items = value if isinstance(value, list) else str(value or "none").split(",")
    names = [s.strip().lower() for s in items if s and s.strip()]
    for n in names:
        if n not in REPORTERS:
            raise ConfigError(f"--report-to: unknown tracker {n!r}; valid: {', '.join(REPORTERS)}")
    return [n for n in dict.fromkeys(names) if n != "none"]


def check_available(names: list[str]) -> None:
    """Fail early, with the install command, when a tracker's package is missing."""
    for n in names:
        module, package = _NEEDS[n]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f'--report-to {n} needs the {package} package: '
                              f'pip install "lm4lv[{package}]" (or pip install {package})') from None


class _TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events logged after its checkpoint (they are logged again)
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, png: Path, step: int, tag: str) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, resume_step: int) -> None:
        import wandb

        from ..config import load_yaml
        from ..util import logs
        from ..util.fsutil import write_text_atomic

        id_file = run_dir / WANDB_DIR / WANDB_RUN_ID
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        config = load_yaml(run_dir / RUN_CONFIG) if (run_dir / RUN_CONFIG).is_file() else {}
        id_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            # console="off": lm4lv routes the workers' output itself (the console, train.log)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                                  name=os.environ.get("WANDB_NAME") or run_dir.name, dir=str(run_dir),
                                  config=config, id=run_id, resume="allow" if run_id else None,
                                  settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:
            raise ConfigError(f"--report-to wandb: cannot start a W&B run ({e}); log in with `wandb login` "
                              "(or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in "
                              f"{run_dir / WANDB_DIR}") from None
        if run_id is None:
            write_text_atomic(id_file, self.run.id + "\n")
        if self.run.offline:
            logs.say(f"W&B run {self.run.id} kept offline in {Path(self.run.dir).parent}; "
                     f"upload it with: wandb sync {Path(self.run.dir).parent}")
        else:
            logs.say(f"W&B run: {self.run.url}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, png: Path, step: int, tag: str) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class Reporter:
    """Writes one run's scalars and preview images to the chosen trackers (rank 0 only)."""

    def __init__(self, run_dir: str | Path, names: list[str], resume_step: int = 0) -> None:
        check_available(names)
        self.trackers: list[Any] = []
        try:
            for n in names:
                self.trackers.append(_TRACKERS[n](Path(run_dir), resume_step))
        except BaseException:
            self.close()
            raise

    def scalars(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        values = {"train/" + k.replace("/", "_per_"): float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float))}
        for t in self.trackers:
            t.scalars(values, step)

    def image(self, png: str | Path, step: int, tag: str = "preview") -> None:
        if not Path(png).is_file():
            return
        for t in self.trackers:
            t.image(Path(png), step, tag)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()
