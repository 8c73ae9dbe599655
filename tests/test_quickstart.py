"""A shortened quickstart, end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from lm4lv_cli.app import app


def test_short_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    script = Path(sys.executable).with_name("lm4lv")  # the installed entry point, as a user runs it
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([str(script), "quickstart", "--out", str(out), "--steps", "4", "--mae-steps", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    # every stage printed the command a user can rerun
    for cmd in ("lm4lv make-data", "lm4lv ft-mae", "lm4lv train", "lm4lv generate", "lm4lv eval"):
        assert f"$ {cmd}" in output
    # only lm4lv's own lines: third-party warnings and logs went to the stages' log files
    for foreign in ("Warning", "warnings.warn", "[INFO]", "[WARNING]", "it/s]", "site-packages", "Traceback"):
        assert foreign not in output, foreign
    assert (out / "run" / "train.log").read_text().startswith("[lm4lv] train job")
    assert "Δ vs degraded" in output  # degraded input and lm4lv in one eval table
    for name in ("report.md", "grid.png", "loss.png", "run/final/lm4lv.yaml", "mae/final/config.json",
                 "generated/results.jsonl", "data/train.json", "data/test.json", "mae/train.log",
                 "generated/generate.log", "scores/noise_sigma25.json"):
        assert (out / name).is_file(), name
    records = [json.loads(x) for x in (out / "generated/results.jsonl").read_text().splitlines()]
    assert len(records) == 6  # 3 held-out images x 2 degradations
    report = (out / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| noise_sigma25") or ln.startswith("| jpeg")]
    assert len(rows) == 2
    for row in rows:  # numbers are measured, one per column: degraded, restored, Δ, ceiling (PSNR; SSIM)
        nums = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)]
        assert len(nums) == 7 and all(n == n for n in nums)
    assert "ceiling" in report and "report.html" in report
    # the comparison page of the held-out images opens in Chromium from disk and works
    from browser import check_compare_page

    facts = check_compare_page(out / "report.html", tmp_path / "shots")
    assert facts["images"] == 3 + 6 * 3  # ground truth + degraded, restored, ceiling per degradation
    assert (out / "run" / "report.html").is_file()
    import numpy as np
    from PIL import Image

    grid = Image.open(out / "grid.png").convert("L")
    assert grid.width > grid.height / 6 * 2  # three columns, six rows
    assert (np.asarray(grid)[:16] < 100).sum() > 50  # column headers above the tiles
    # a second run refuses to overwrite without the flag
    res2 = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--steps", "1"])
    assert res2.exit_code != 0 and "--overwrite" in str(res2.exception)


def test_quickstart_overwrite_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.json").write_text("[]")
    res = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--overwrite", "--steps", "1"])
    assert res.exit_code != 0 and "not a quickstart folder" in str(res.exception)
    assert (tmp_path / "data" / "mine.json").read_text() == "[]"
