"""Labelled comparison grids and several prediction folders in one ``lm4lv eval``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.image import metrics as M
from lm4lv_core.jobs.evaluate import compare_paths, grid_names
from lm4lv_core.image.grids import comparison_grid, scores_caption


def _dark(img: Image.Image, box) -> int:
    return int((np.asarray(img.crop(box).convert("L")) < 100).sum())


def test_grid_has_headers_row_labels_and_scores():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    cap = scores_caption(noisy, clean)
    assert cap == f"PSNR {M.psnr(clean, noisy):.2f} dB\nSSIM {M.ssim(clean, noisy):.3f}"
    assert scores_caption(noisy, None) == "" and scores_caption(noisy[:16], clean) == ""
    bare = comparison_grid([[noisy, clean]], ["", ""], [""], scale=4, pad=6)
    grid = comparison_grid([[noisy, clean]], ["degraded", "ground truth"], ["cat\nnoise"], [[cap, ""]],
                           scale=4, pad=6)
    assert grid.width > bare.width and grid.height > bare.height
    label_w = grid.width - bare.width  # the row-label column
    assert _dark(grid, (0, 0, grid.width, 20)) > 20                       # column headers
    assert _dark(grid, (0, 20, label_w, grid.height)) > 20                # row label
    assert _dark(grid, (label_w, 20 + 128 + 6, grid.width, grid.height)) > 20  # caption under the tile
    assert _dark(bare, (0, 0, bare.width, 6)) == 0


@pytest.fixture()
def three(tmp_path):
    """Ground truth and two prediction folders (noisier and cleaner) of five images."""
    rng = np.random.default_rng(1)
    gt, a, b = (tmp_path / n for n in ("gt", "noisy", "restored"))
    for d in (gt, a, b):
        d.mkdir()
    for i in range(5):
        clean = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(clean).save(gt / f"{i}.png")
        for d, sigma in ((a, 30.0), (b, 5.0 + 5 * i)):
            Image.fromarray(np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return gt, a, b


def test_eval_several_prediction_folders(three, tmp_path):
    gt, a, b = three
    res = CliRunner().invoke(app, ["eval", "psnr,ssim", str(gt), str(a), str(b), "--labels", "input,lm4lv",
                                   "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
                                   "--grid", str(tmp_path / "grid.png")])
    assert res.exit_code == 0, res.output
    assert "input" in res.output and "lm4lv" in res.output and "Δ vs input" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    first, second = data["predictions"]
    assert [first["label"], second["label"]] == ["input", "lm4lv"] and first["difference_to_first"] is None
    solo_a, solo_b = M.evaluate_paths("psnr,ssim", gt, a), M.evaluate_paths("psnr,ssim", gt, b)
    assert first["mean"]["psnr"] == pytest.approx(solo_a.mean("psnr"))
    assert second["difference_to_first"]["psnr"] == pytest.approx(solo_b.mean("psnr") - solo_a.mean("psnr"))
    assert len(second["images"]) == 5
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["label"] for r in rows] == ["input"] * 5 + ["lm4lv"] * 5
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 128 and grid.height > 3 * 128  # 3 columns (2 folders + truth), 3 rows


def test_grid_rows_worst_median_best_by_gain(three):
    gt, a, b = three
    cmp = compare_paths("psnr", gt, [a, b])
    gains = {r["name"]: cmp.row(1, r["name"])["psnr"] - r["psnr"] for r in cmp.reports[0].rows}
    order = sorted(gains, key=gains.get)
    picks = grid_names(cmp)
    assert [n for n, _ in picks] == [order[0], order[2], order[-1]]
    assert picks[0][1].startswith(f"{order[0]}\nworst: PSNR gain") and "best" in picks[2][1]
    assert [n for n, _ in grid_names(cmp, rows=2)] == ["0", "1"]
