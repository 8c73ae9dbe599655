"""Size and load time of the comparison page (``lm4lv eval --html``) for 100 and 10 000 images.

Writes N small PNG triplets (ground truth and two prediction folders, 64 px), builds the page
with the same builder ``eval --html`` uses (scores are synthetic: the page, not the scoring, is
measured), opens it in headless Chromium from disk and prints one JSON object: per N the page's
and data file's sizes, the time to write them, and the time until the page is ready (first
table page and first comparison shown), plus the ratios 10 000 / 100.

    python benchmarks/html_page.py [--sizes 100,10000] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_images(root: Path, n: int, size: int = 64) -> list:
    from lm4lv_core.report.html import PageRow

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
    rows = []
    for i in range(n):
        sub = f"d{i // 1000:02d}"
        paths = []
        for d in ("gt", "noisy", "restored"):
            p = root / d / sub / f"img{i:05d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(base, i, axis=1)).save(p, compress_level=1)
            paths.append(str(p))
        a, b = float(rng.normal(20, 1)), float(rng.normal(24, 2))
        rows.append(PageRow(f"{sub}/img{i:05d}.png", paths[0], paths[1:],
                            [{"psnr": a, "ssim": 0.5}, {"psnr": b, "ssim": 0.7}], sub))
    return rows


def measure(n: int, chromium: str, tmp: Path) -> dict:
    from playwright.sync_api import sync_playwright

    from lm4lv_core.report.html import write_page

    root = tmp / str(n)
    rows = make_images(root, n)
    t0 = time.perf_counter()
    stats = write_page(root / "page.html", title=f"{n} images", labels=["noisy", "restored"], metrics=["psnr", "ssim"],
                       rows=rows)
    write_s = time.perf_counter() - t0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        loads = []
        for _ in range(3):
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            t0 = time.perf_counter()
            page.goto((root / "page.html").as_uri())
            page.wait_for_selector("body[data-ready='1']")
            page.wait_for_function("document.getElementById('imgL').complete")
            loads.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            page.click("#rows th[data-key='gain1_psnr']")
            sort_s = time.perf_counter() - t1
            heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : null")
            page.close()
        browser.close()
    return {"images": n, "page_bytes": stats.page_bytes, "data_bytes": stats.data_bytes,
            "write_s": round(write_s, 3), "load_s": round(min(loads), 3), "sort_s": round(sort_s, 3),
            "js_heap_bytes": heap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,10000")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="lm4lv-html-bench-") as tmp:
        res = [measure(n, args.chromium, Path(tmp)) for n in sizes]
    out = {"results": res}
    if len(res) > 1:
        a, b = res[0], res[-1]
        out["ratio"] = {k: round(b[k] / a[k], 2) for k in ("page_bytes", "data_bytes", "load_s")}
        out["ratio"]["of"] = f"{b['images']} / {a['images']} images"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
