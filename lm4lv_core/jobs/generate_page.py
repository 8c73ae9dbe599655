"""``lm4lv generate --html PAGE``: the comparison page of a generation (see
:mod:`lm4lv_core.report.html`): each sample's input next to what lm4lv made of it and, for training
samples whose image answer was dropped to be generated, that answer as the ground truth, scored
with PSNR / SSIM."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..data.format import IMAGE_TOKEN, load_checked
from ..data.outputs import RESULTS
from ..defaults import CROP_BORDER
from ..report.html import PageRow, PageStats, write_page

METRICS = ("psnr", "ssim")


def _answer_images(data: str, image_root: str | None) -> dict[int, str]:
    """Sample index → the image of its last gpt turn (the answer generation dropped), where it has one."""
    out = {}
    for s in load_checked(data, image_root=image_root, mode="train", check_files=False):
        last = s.turns[-1] if s.turns else None
        if last is not None and last.role == "gpt" and IMAGE_TOKEN in last.value and s.images:
            out[s.index] = s.images[-1]
    return out


def _scores(gt: str, pred: str) -> dict[str, float] | None:
    """PSNR / SSIM of ``pred`` against ``gt`` (None when their sizes differ)."""
    import numpy as np

    from ..image.io import load_rgb
    from ..image.metrics import METRICS as REG

    a, b = np.asarray(load_rgb(gt)), np.asarray(load_rgb(pred))
    if a.shape != b.shape:
        return None
    return {m: float(REG.get(m).score(a, b, CROP_BORDER, False, None)) for m in METRICS}


def generation_page(page: str | os.PathLike, out: str | os.PathLike, data: str | None = None,
                    image_root: str | None = None) -> PageStats:
    """Write ``page`` for the generation in ``out`` (its ``results.jsonl``); ``data``: the data
    file it generated for (answers dropped from training samples become the ground truth)."""
    out = Path(out)
    answers = _answer_images(data, image_root) if data else {}
    rows = []
    for line in (out / RESULTS).read_text(encoding="utf-8").splitlines():
        rec: dict[str, Any] = json.loads(line)
        made = [str(out / o) for o in rec.get("outputs", [])]
        if not made:
            continue
        src, gt = (rec.get("inputs") or [None])[0], answers.get(int(rec["index"]))
        scores = [_scores(gt, src) if gt and src else None, _scores(gt, made[0]) if gt else None]
        rows.append(PageRow(f"{rec['index']}: {Path(src).name if src else ''}", gt, [src, made[0]], scores))
    return write_page(page, title=f"lm4lv generate: {out}", labels=["input", "lm4lv"],
                      metrics=list(METRICS) if answers else [], rows=rows,
                      settings={"crop_border": CROP_BORDER} if answers else None)


def restoration_page(page: str | os.PathLike, out: str | os.PathLike, items) -> PageStats:
    """Write ``page`` for ``generate --input``: every input beside its restored image."""
    out = Path(out)
    rows = [PageRow(it.dst, None, [it.src, str(out / it.dst)], [None, None]) for it in items
            if (out / it.dst).is_file()]
    return write_page(page, title=f"lm4lv generate --input: {out}", labels=["input", "lm4lv"], metrics=[], rows=rows)
