"""The comparison page of ``lm4lv eval --html``, checked in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import check_compare_page
from conftest import run_cli


def _folders(root: Path, n: int = 6, size=(48, 40)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = "sub/" if i % 2 else ""
        g = rng.integers(0, 255, (*size, 3)).astype(np.uint8)
        for d, s in (("gt", 0), ("noisy", 40), ("restored", 5 + 6 * (i * 7 % n))):
            (root / d / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(g + rng.normal(0, s, g.shape), 0, 255).astype(np.uint8)).save(root / d / f"{sub}im{i}.png")
    (root / "restored" / "extra.png").write_bytes((root / "gt" / "im0.png").read_bytes())
    return root


def test_eval_html_page_in_browser(tmp_path, monkeypatch, capsys):
    root = _folders(tmp_path / "imgs")
    page = tmp_path / "out" / "compare.html"
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr,ssim", root / "gt", root / "noisy", root / "restored",
                        "--html", page)
    assert code == 0, out
    assert f"page: {page}" in out
    data = (page.parent / "compare_files" / "data.js").read_text()
    assert '"unmatched"' in data and "extra.png" in data
    facts = check_compare_page(page, tmp_path / "shots")
    assert facts["reordered"]
    assert facts["images"] == 6 * 3


def test_html_exists_needs_overwrite(tmp_path, monkeypatch, capsys):
    root = _folders(tmp_path / "imgs", n=2)
    page = tmp_path / "p.html"
    page.write_text("mine")
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--html", page)
    assert code == 2 and out.strip().count("\n") == 0 and out.strip().startswith("error: --html")
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--html", page, "--overwrite")
    assert code == 2 and "not written by lm4lv" in out and page.read_text() == "mine"
    page.unlink()
    assert run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--html", page)[0] == 0
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--html", page)
    assert code == 2 and out.strip().startswith("error: --html") and "--overwrite" in out
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--html", page, "--overwrite")
    assert code == 0, out


def test_large_page_stays_small(tmp_path):
    """The page is the same few kilobytes for 10 000 images; the data file grows with them."""
    from lm4lv_core.report.html import PageRow, write_page

    def rows(n):
        return [PageRow(f"d{i // 1000}/img{i:05d}.png", f"/data/gt/d{i // 1000}/img{i:05d}.png",
                        [f"/data/a/d{i // 1000}/img{i:05d}.png"], [{"psnr": 20.0 + i % 7}], f"d{i // 1000}")
                for i in range(n)]

    small = write_page(tmp_path / "s.html", title="s", labels=["a"], metrics=["psnr"], rows=rows(100), thumb_size=0)
    big = write_page(tmp_path / "b.html", title="b", labels=["a"], metrics=["psnr"], rows=rows(10_000), thumb_size=0)
    assert big.page_bytes == small.page_bytes < 30_000
    assert big.data_bytes < 100 * 10_000


def test_run_report_page(tmp_path):
    """``report.html`` of a training run: loss curves and the preview grids by step."""
    from browser import browser_page
    from lm4lv_core.report.run_page import write_run_report

    run = tmp_path / "run"
    (run / "previews").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,loss,text_loss,vision_loss,lr\n" +
                                     "".join(f"{s},{2 / s},0,{1 / s},0.001\n" for s in range(1, 41)))
    for s in (10, 20, 40):
        Image.fromarray(np.full((16, 48, 3), s * 5, np.uint8)).save(run / "previews" / f"step-{s}.png")
    page = write_run_report(run)
    with browser_page() as p:
        p.goto(page.as_uri())
        assert p.locator("#loss polyline").count() == 2  # loss, vision_loss (text_loss is all 0)
        assert p.evaluate("Array.from(document.querySelectorAll('#previews img')).length") == 3
        visible = "() => document.querySelector('#previews figure:not([hidden])').dataset.step"
        assert p.evaluate(visible) == "40"
        p.keyboard.press("ArrowLeft")
        assert p.evaluate(visible) == "20"
        p.wait_for_function("Array.from(document.querySelectorAll('#previews figure:not([hidden]) img'))"
                            ".every(i => i.complete && i.naturalWidth > 0)")
        assert not p.problems, p.problems


def test_eval_ceiling_from_a_run(tmp_path, monkeypatch, capsys):
    """``--ceiling RUN``: the run's encoder → decoder reconstruction of GT, scored as one more folder
    and shown on the page."""
    import json

    import torch

    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = _folders(tmp_path / "imgs", n=3)
    torch.manual_seed(0)
    LM4LV.from_config(preset_config("tiny")).save_pretrained(tmp_path / "run" / "final")
    page = tmp_path / "c.html"
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--ceiling", tmp_path / "run",
                        "--html", page, "--json", tmp_path / "c.json")
    assert code == 0, out
    data = json.loads((tmp_path / "c.json").read_text())
    assert [p["label"] for p in data["predictions"]] == ["noisy", "ceiling"]
    assert data["predictions"][1]["count"] == 3
    assert len(list((tmp_path / "c_files" / "ceiling").rglob("*.png"))) == 3
    code, out = run_cli(monkeypatch, capsys, "eval", "psnr", root / "gt", root / "noisy", "--ceiling", "nonsense")
    assert code == 2 and "error: --ceiling" in out


def test_generate_html_page_in_browser(tmp_path, monkeypatch, capsys):
    """``generate --html``: every input beside lm4lv's image and the dropped answer as ground truth,
    scored; the same checks in the browser as eval's page."""
    import torch

    from conftest import write_pairs
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    data = write_pairs(tmp_path / "data", n=3)
    torch.manual_seed(0)
    LM4LV.from_config(preset_config("tiny", restore_prompt="<image> <task>")).save_pretrained(tmp_path / "run" / "final")
    page = tmp_path / "gen.html"
    code, out = run_cli(monkeypatch, capsys, "generate", "--run", tmp_path / "run", "--data", data,
                        "--out", tmp_path / "gen", "--html", page)
    assert code == 0, out
    js = (tmp_path / "gen_files" / "data.js").read_text()
    assert '"metrics":["psnr","ssim"]' in js and '"data/hq/"' in js  # the dropped answers: ground truth, scored
    facts = check_compare_page(page, tmp_path / "shots", min_rows=3)
    assert facts["images"] == 3 * 3
    code, out = run_cli(monkeypatch, capsys, "generate", "--run", tmp_path / "run", "--input", tmp_path / "data" / "lq",
                        "--out", tmp_path / "restored", "--html", page)
    assert code == 2 and out.strip().splitlines()[-1].startswith(f"error: --html {page}: exists")
    assert not (tmp_path / "restored").exists()
