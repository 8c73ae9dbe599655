"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright, for the page and demo tests."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LM4LV_CHROMIUM", "/usr/bin/chromium")


def chromium_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if not path:
        pytest.skip("no chromium (apt-get install -y chromium; .ci/run installs it)")
    pytest.importorskip("playwright.sync_api")
    return path


@contextmanager
def browser_page(allowed=("file://",), width: int = 1280, height: int = 1000):
    """A page that records console errors, page errors and every request outside ``allowed``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.problems = []
            page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
            page.on("request", lambda r: r.url.startswith(tuple(allowed)) or r.url.startswith("data:")
                    or r.url.startswith("blob:") or page.problems.append(f"request: {r.url}"))
            page.on("requestfailed", lambda r: page.problems.append(f"failed: {r.url} {r.failure}"))
            yield page
        finally:
            browser.close()


LOAD_ALL = """async () => {
  const bad = [];
  await Promise.all(window.lm4lv.images().map(src => new Promise(ok => {
    const im = new Image(); im.onload = () => { if (!im.naturalWidth) bad.push(src); ok(); };
    im.onerror = () => { bad.push(src); ok(); }; im.src = src; })));
  return {count: window.lm4lv.images().length, bad};
}"""


def check_compare_page(page_file: Path, shots: Path, *, min_rows: int = 2) -> dict:
    """Open a comparison page from disk and check it as a person would use it; returns facts
    for the caller (load time, image count). Screenshots go into ``shots``."""
    import numpy as np
    from PIL import Image

    shots.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    with browser_page() as page:
        page.goto(page_file.resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']")
        facts["load_ms"] = page.evaluate("performance.now()")
        # every image the page references loads
        res = page.evaluate(LOAD_ALL)
        assert not res["bad"], res["bad"][:5]
        facts["images"] = res["count"]
        page.wait_for_function("document.getElementById('imgL').complete && document.getElementById('imgR').complete")
        assert page.evaluate("document.getElementById('imgL').naturalWidth > 0 && document.getElementById('imgR').naturalWidth > 0")
        page.locator("#rows").scroll_into_view_if_needed()  # thumbnails load lazily, when shown
        page.wait_for_function("Array.from(document.querySelectorAll('#rows img')).slice(0, 8)"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=15000)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "page.png"), full_page=True)
        # the slider changes what is shown
        view = page.locator("#view")
        page.evaluate("window.lm4lv.setSplit(100)")
        a = view.screenshot(path=str(shots / "split-100.png"))
        page.evaluate("window.lm4lv.setSplit(0)")
        b = view.screenshot(path=str(shots / "split-0.png"))
        assert a != b, "moving the slider changed nothing on screen"
        page.locator("#slider").fill("50")
        assert abs(page.evaluate("window.lm4lv.view.split") - 50) < 1e-6
        # sorting by PSNR gain of the second folder reorders the rows
        rows = int(page.evaluate("window.lm4lv.rows.length"))
        assert rows >= min_rows
        labels = page.evaluate("window.LM4LV_PAGE.labels")
        if len(labels) > 1:
            before = page.eval_on_selector_all("#rows tbody tr", "t => t.map(r => r.dataset.index)")
            page.click("#rows th[data-key='gain1_psnr']")
            after = page.eval_on_selector_all("#rows tbody tr", "t => t.map(r => r.dataset.index)")
            gains = page.evaluate("""() => Array.from(document.querySelectorAll('#rows tbody tr')).map(tr => {
                const r = window.lm4lv.rows[+tr.dataset.index]; const P = window.LM4LV_PAGE.metrics.length;
                const i = window.LM4LV_PAGE.metrics.indexOf('psnr'); return r.v[P + i] - r.v[i]; })""")
            assert gains == sorted(gains)
            assert sorted(after) == sorted(before)
            facts["reordered"] = after != before
            page.click("#rows th[data-key='gain1_psnr']")  # again: descending
            gains = page.evaluate("""() => Array.from(document.querySelectorAll('#rows tbody tr')).map(tr => {
                const r = window.lm4lv.rows[+tr.dataset.index]; const P = window.LM4LV_PAGE.metrics.length;
                const i = window.LM4LV_PAGE.metrics.indexOf('psnr'); return r.v[P + i] - r.v[i]; })""")
            assert gains == sorted(gains, reverse=True)
        # keyboard: the next image in the table's order
        page.click("#rows tbody tr:first-child")
        first = page.text_content("#curname")
        order = page.eval_on_selector_all("#rows tbody tr", "t => t.map(r => +r.dataset.index)")
        page.locator("#view").focus()
        page.keyboard.press("j")
        expect = page.evaluate(f"window.lm4lv.rows[{order[1]}].name")
        assert page.text_content("#curname").startswith(expect) and page.text_content("#curname") != first
        page.keyboard.press("k")
        assert page.text_content("#curname") == first
        # keyboard: choose the pair
        left = page.input_value("#selL")
        page.keyboard.press("a")
        assert page.input_value("#selL") != left
        page.keyboard.press("A")
        # zoom down to single pixels: squares of one colour, drawn nearest-neighbour
        page.keyboard.press("0")
        for _ in range(6):
            page.keyboard.press("+")
        z = page.evaluate("window.lm4lv.view.z")
        assert z >= 16, z
        assert page.evaluate("getComputedStyle(document.getElementById('imgL')).imageRendering") == "pixelated"
        page.evaluate("window.lm4lv.setSplit(100)")
        shot = shots / "zoom.png"
        view.screenshot(path=str(shot))
        img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        h, w = img.shape[:2]
        crop = img[h // 2 - 48:h // 2 + 48, w // 2 - 48:w // 2 + 48]
        # at >= 16x a 96x96 crop shows at most 7x7 source pixels
        colours = len({tuple(c) for c in crop.reshape(-1, 3)})
        assert colours <= 49, colours
        # a row of the crop is constant over runs of >= 8 screen pixels
        runs = np.flatnonzero(np.any(np.diff(crop[48], axis=0) != 0, axis=1))
        assert len(runs) <= 96 // 8 + 1, runs
        facts["zoom"] = z
        page.keyboard.press("0")
        page.evaluate("window.lm4lv.setSplit(50)")
        page.locator("#view").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "compare.png"))
        assert not page.problems, page.problems
    return facts
