"""``lm4lv demo``: the Gradio app in headless Chromium restores an uploaded image exactly as
``lm4lv generate --input`` does; bad input is one error line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from browser import browser_page
from conftest import run_cli, write_pairs

PROMPT = "<image> <task>"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "GRADIO_ANALYTICS_ENABLED": "False"}
LM4LV = str(Path(sys.executable).parent / "lm4lv")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import torch

    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = tmp_path_factory.mktemp("demo")
    write_pairs(root / "data", n=2)
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    cfg.restore_prompt = PROMPT  # (before from_config, which freezes the model's config)
    model = LM4LV.from_config(cfg)
    model.save_pretrained(root / "run" / "final")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([LM4LV, "demo", "--run", str(run), "--port", str(port), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_up(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("demo did not start")


def test_demo_restores_like_generate_input(run_dir, tmp_path):
    pytest.importorskip("gradio")
    src = tmp_path / "upload.png"
    src.write_bytes((run_dir / "data" / "lq" / "0.png").read_bytes())
    ref = tmp_path / "ref"
    proc = subprocess.run([LM4LV, "generate", "--run", str(run_dir / "run"), "--input", str(src), "--out", str(ref)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = np.asarray(Image.open(ref / "upload.png").convert("RGB"))

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    demo = _start(run_dir / "run", port)
    try:
        _wait_up(demo, url)
        with browser_page(allowed=(url,), height=1200) as page:
            page.goto(url)
            page.wait_for_selector("#restore")
            page.set_input_files("#input input[type=file]", str(src))
            page.wait_for_selector("#input img", timeout=30000)
            page.click("#restore")
            link = page.wait_for_selector("#download a[href]", timeout=120000)
            href = link.get_attribute("href")
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            shown = page.eval_on_selector_all("#slider img", "t => t.map(i => i.naturalWidth)")
            assert len(shown) >= 2 and all(shown), shown  # before and after are on the slider
            # (the event stream of Gradio's queue is closed by the page when a result is in: not a problem)
            problems = [p for p in page.problems if not ("/gradio_api/queue/data" in p and "ERR_ABORTED" in p)]
            assert not problems, problems
        with urllib.request.urlopen(href if href.startswith("http") else url + href, timeout=30) as r:
            got = tmp_path / "got.png"
            got.write_bytes(r.read())
        assert np.array_equal(np.asarray(Image.open(got).convert("RGB")), expected)
    finally:
        demo.terminate()
        demo.wait(30)


def test_demo_refusals(run_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    # a port in use
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out = run_cli(monkeypatch, capsys, "demo", "--run", run_dir / "run", "--port", port)
    assert code == 2 and out.strip().count("\n") == 0 and out.strip().startswith("error: --port") and "in use" in out
    # a model without a vision decoder
    text_only = tmp_path / "text-only"
    (text_only / "final").mkdir(parents=True)
    for f in (run_dir / "run" / "final").iterdir():
        if f.is_file():
            (text_only / "final" / f.name).write_bytes(f.read_bytes())
    cfg = yaml.safe_load((text_only / "final" / "lm4lv.yaml").read_text())
    cfg["decoder"] = None
    (text_only / "final" / "lm4lv.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run_cli(monkeypatch, capsys, "demo", "--run", text_only, "--port", _free_port())
    assert code == 2 and out.strip().count("\n") == 0 and "no vision decoder" in out, out
