"""`lm4lv generate --input`: restore image files and folders into mirrored paths with the run's
recorded restoration prompt; re-runs, --overwrite, --prompt, refusals, two workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from lm4lv_core.data.format import parse_sample
from lm4lv_core.errors import LM4LVError
from lm4lv_core.tasks.lm4lv import restoration_prompt

PROMPT = "<image> restore <task>"


lm4lv = run_cli  # lm4lv ARGS in this process


def console_script(*args, cwd) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lm4lv")  # the installed entry point
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def _picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two saved tiny models (with and without a recorded prompt) and a folder of inputs: nested
    subfolders, png / jpg / bmp, a hidden file, a non-image."""
    import dataclasses

    from lm4lv_core.config import thawed
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = tmp_path_factory.mktemp("restore")
    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny"))
    model.save_pretrained(root / "bare" / "final")
    model.config = dataclasses.replace(thawed(model.config), restore_prompt=PROMPT)  # (a model saved with one)
    model.save_pretrained(root / "run" / "final")
    inp = root / "inputs"
    (inp / "sub" / "deeper").mkdir(parents=True)
    _picture(40, 30, 0).save(inp / "a.png")
    _picture(36, 20, 1).save(inp / "sub" / "b.jpg", quality=95)
    _picture(33, 33, 2).save(inp / "sub" / "deeper" / "c.bmp")
    _picture(8, 8, 3).save(inp / "sub" / ".hidden.png")
    (inp / "notes.txt").write_text("not an image")
    return root


EXPECTED = {"a.png": ((40, 30), "PNG", "a.png"), "sub/b.jpg": ((36, 20), "JPEG", "sub/b.jpg"),
            "sub/deeper/c.png": ((33, 33), "PNG", "sub/deeper/c.bmp")}


def _outputs(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in out.rglob("*")
            if p.is_file() and p.suffix in (".png", ".jpg") and not p.name.startswith(".")}


def _mtimes(out: Path) -> dict[str, int]:
    return {k: p.stat().st_mtime_ns for k, p in _outputs(out).items()}


def test_folder_is_restored_to_mirrored_paths_and_sizes_then_skipped_and_overwritten(setup, tmp_path, monkeypatch,
                                                                                    capsys):
    from lm4lv_core.model.generate import restore
    from lm4lv_core.model.lm4lv import LM4LV

    out = tmp_path / "out"
    args = ["generate", "--run", setup / "run", "--input", setup / "inputs", "--out", out, "--batch-size", "2"]
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0, log
    assert "3/3 images restored (3 now)" in log, log
    files = _outputs(out)
    assert sorted(files) == sorted(EXPECTED)
    model = LM4LV.from_pretrained(setup / "run" / "final").eval()
    for rel, (size, fmt, src) in EXPECTED.items():
        with Image.open(files[rel]) as im:
            assert (im.size, im.format) == (size, fmt), rel
            got = np.asarray(im.convert("RGB"), dtype=np.int16)
        with Image.open(setup / "inputs" / src) as im:
            inp = im.convert("RGB")
        # the model's restoration with the recorded prompt, not a copy of the input
        (want,) = restore(model, [inp], prompt=PROMPT)
        want = np.asarray(want, dtype=np.int16)
        if fmt == "PNG":
            assert np.array_equal(got, want), rel
        else:  # JPEG at quality 95
            assert np.abs(got - want).mean() < 6, rel
        assert np.abs(got - np.asarray(inp, dtype=np.int16)).mean() > 10, rel
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["format"] == "lm4lv-restore" and manifest["prompt"] == PROMPT

    # a re-run skips every finished image; a lost output is restored alone
    before = _mtimes(out)
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0 and "3/3 images restored (0 now, 3 already done)" in log, log
    assert _mtimes(out) == before
    (out / "sub" / "b.jpg").unlink()
    code, log = lm4lv(monkeypatch, capsys, *args)
    assert code == 0 and "(1 now, 2 already done)" in log, log
    after = _mtimes(out)
    assert after["a.png"] == before["a.png"] and after["sub/b.jpg"] != before["sub/b.jpg"]

    # --overwrite restores every image again
    code, log = lm4lv(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and "3/3 images restored (3 now)" in log, log
    assert all(_mtimes(out)[k] != after[k] for k in after)


def test_prompt_overrides_the_recorded_one_and_a_run_without_one_needs_it(setup, tmp_path, monkeypatch, capsys):
    from lm4lv_core.model.generate import restore
    from lm4lv_core.model.lm4lv import LM4LV

    other = "<image> denoise this <task>"
    img = setup / "inputs" / "a.png"
    out = tmp_path / "out"
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "bare", "--input", img, "--out", out,
                      "--prompt", other)
    assert code == 0, log
    model = LM4LV.from_pretrained(setup / "bare" / "final").eval()
    with Image.open(img) as im:
        (want,) = restore(model, [im.convert("RGB")], prompt=other)
        (recorded,) = restore(model, [im.convert("RGB")], prompt=PROMPT)
    got = np.asarray(Image.open(out / "a.png"), dtype=np.int16)
    assert np.array_equal(got, np.asarray(want, dtype=np.int16))  # one image per batch either way: exact
    assert not np.array_equal(got, np.asarray(recorded, dtype=np.int16))  # the prompt matters
    # the same folder with another prompt: refused unless --overwrite
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "bare", "--input", img, "--out", out,
                      "--prompt", PROMPT)
    assert code == 2 and "another prompt" in log and "--overwrite" in log, log



def test_a_model_without_a_recorded_prompt_needs_one_given(setup, tmp_path, monkeypatch, capsys):
    """One rule for the command and the API: the prompt given, else the recorded one, else an error
    (never a prompt the model did not learn)."""
    from lm4lv_core.defaults import DEFAULT_PROMPT
    from lm4lv_core.errors import ConfigError
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.model.restore import restore

    img = setup / "inputs" / "a.png"
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "bare", "--input", img, "--out",
                      tmp_path / "out")
    assert code == 2 and "no recorded restoration prompt" in log.strip().splitlines()[-1], log
    assert not (tmp_path / "out").exists()
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "bare", "--input", img, "--out",
                      tmp_path / "out", "--prompt", DEFAULT_PROMPT)
    assert code == 0, log
    model = LM4LV.from_pretrained(setup / "bare" / "final")
    with Image.open(img) as im:
        with pytest.raises(ConfigError, match="no recorded restoration prompt"):
            restore(model, [im.convert("RGB")])
        (explicit,) = restore(model, [im.convert("RGB")], prompt=DEFAULT_PROMPT)
    got = np.asarray(Image.open(tmp_path / "out" / "a.png"), dtype=np.int16)
    assert np.array_equal(got, np.asarray(explicit, dtype=np.int16))


def test_command_line_mistakes(setup, tmp_path):
    """Through the installed script: one error line, exit 2, nothing written."""
    data = tmp_path / "d.json"
    data.write_text("[]")
    cases = [
        (["--run", setup / "run", "--input", setup / "inputs", "--data", data], "not both"),
        (["--run", setup / "run", "--input", setup / "inputs", "--prompt", "<task>"], "exactly one <image>"),
        (["--run", setup / "run", "--input", setup / "inputs" / "notes.txt"], "not an image"),
        (["--run", setup / "run", "--input", setup / "inputs", "--mode", "text"], "--mode text"),
    ]
    for args, message in cases:
        proc = console_script("generate", *args, "--out", tmp_path / "out", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_several_inputs_and_out_inside_the_input_folder(setup, tmp_path, monkeypatch, capsys):
    import shutil

    inp = tmp_path / "photos"
    shutil.copytree(setup / "inputs", inp)
    # files and folders together: paths relative to their common folder
    out = tmp_path / "several"
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "--input", inp / "a.png",
                      inp / "sub", "--out", out)
    assert code == 0 and "3/3 images restored" in log, log
    assert sorted(_outputs(out)) == ["a.png", "sub/b.jpg", "sub/deeper/c.png"]
    # OUT inside the input folder: its restored images are not taken as inputs on a re-run
    inner = inp / "restored"
    for _ in range(2):
        code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "-i", inp, "-o", inner)
        assert code == 0 and "3/3 images restored" in log, log
    # OUT = the input folder, or a collision of two inputs on one output name
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "-i", inp, "-o", inp)
    assert code == 2 and "is the input folder" in log, log
    _picture(10, 10, 4).save(inp / "a.tif")
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "-i", inp, "-o", tmp_path / "clash")
    assert code == 2 and "a.png" in log and "a.tif" in log and "both" in log, log
    assert not (tmp_path / "clash").exists()
    # an unreadable image stops the run before anything is written
    (inp / "a.tif").unlink()
    (inp / "sub" / "broken.jpg").write_text("not a jpeg")
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", setup / "run", "-i", inp, "-o", tmp_path / "bad")
    assert code == 2 and "broken.jpg" in log and "unreadable" in log, log
    assert not (tmp_path / "bad").exists()


def test_restoration_prompt_is_the_first_restoration_samples_human_turn():
    def sample(i, turns, task_type="conversation"):
        n = sum(v.count("<image>") for _, v in turns)
        return parse_sample({"task_type": task_type, "image": [f"{k}.png" for k in range(n)],
                             "conversations": [{"from": r, "value": v} for r, v in turns]}, i)

    caption = sample(0, [("human", "<image> describe"), ("gpt", "a cat")])
    simple = sample(1, [("none", "<image> <task>"), ("none", "<image>")], "simple")
    two = sample(2, [("human", "<image> <image> <task>"), ("gpt", "<image>")])
    restoring = sample(3, [("human", "<image> fix <task>"), ("gpt", "<image>")])
    later = sample(4, [("human", "<image> <task>"), ("gpt", "<image>")])
    assert restoration_prompt([caption, simple, two, restoring, later]) == "<image> fix <task>"
    assert restoration_prompt([caption, simple, two]) is None


def test_training_records_the_prompt_that_generate_input_uses(tmp_path, monkeypatch, capsys):
    from conftest import write_pairs

    data = write_pairs(tmp_path / "data", n=2)
    samples = json.loads(data.read_text())
    for s in samples:
        s["conversations"][0]["value"] = "<image> remove the noise <task>"
    data.write_text(json.dumps(samples))
    run = tmp_path / "run"
    code, log = lm4lv(monkeypatch, capsys, "train", "--data", data, "--out", run, "--preset", "tiny",
                      "--max-steps", "1", "--micro-batch", "2")
    assert code == 0, log
    import yaml

    assert yaml.safe_load((run / "final" / "lm4lv.yaml").read_text())["restore_prompt"] == \
        "<image> remove the noise <task>"
    out = tmp_path / "out"
    code, log = lm4lv(monkeypatch, capsys, "generate", "--run", run, "--input", tmp_path / "data" / "lq", "--out", out)
    assert code == 0 and "2/2 images restored" in log, log
    assert json.loads((out / "generate.json").read_text())["prompt"] == "<image> remove the noise <task>"
    assert sorted(_outputs(out)) == ["0.png", "1.png"]


def test_restore_folder_api(setup, tmp_path):
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.model.restore import restore_folder

    model = LM4LV.from_pretrained(setup / "run" / "final")
    out = tmp_path / "api"
    count = restore_folder(model, setup / "inputs", out, batch_size=3)
    assert (count.restored, count.skipped, count.total) == (3, 0, 3)
    assert sorted(_outputs(out)) == sorted(EXPECTED)
    assert restore_folder(model, setup / "inputs", out).skipped == 3
    assert restore_folder(model, setup / "inputs", out, overwrite=True).restored == 3
    # a cut-off image among them: stop names it, skip restores the rest and lists it
    inp = tmp_path / "in"
    shutil.copytree(setup / "inputs", inp)
    bad = _cut_jpeg(next(p for p in sorted(inp.rglob("*")) if p.is_file()), inp / "0cut.jpg")
    with pytest.raises(LM4LVError, match=re.escape(str(bad))):
        restore_folder(model, inp, tmp_path / "stopped")
    count = restore_folder(model, inp, tmp_path / "skipped", on_error="skip")
    assert (count.restored, count.total) == (3, 4) and [p for p, _ in count.failures] == [str(bad)]
    assert sorted(_outputs(tmp_path / "skipped")) == sorted(EXPECTED)


@pytest.mark.slow
def test_two_workers_restore_every_image_once(setup, tmp_path, monkeypatch, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["generate", "--run", setup / "run", "--input", setup / "inputs", "--batch-size", "1"]
    assert lm4lv(monkeypatch, capsys, *base, "--out", one)[0] == 0
    code, log = lm4lv(monkeypatch, capsys, *base, "--out", two, "--nproc", "2")
    assert code == 0 and "3/3 images restored (3 now)" in log, log
    a, b = _outputs(one), _outputs(two)
    assert sorted(a) == sorted(b) == sorted(EXPECTED)
    for rel in a:
        x = np.asarray(Image.open(a[rel]), dtype=np.int16)
        y = np.asarray(Image.open(b[rel]), dtype=np.int16)
        assert np.abs(x - y).mean() < 1, rel


def _cut_jpeg(src: Path, dst: Path) -> Path:
    """A JPEG cut off in its pixel data: its header reads (it passes generate's check before the
    workers start), decoding it fails."""
    import io

    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    dst.write_bytes(data[:int(len(data) * 0.8)])
    return dst


@pytest.mark.parametrize("tile", [None, 16])
def test_restore_items_leaves_out_an_image_that_fails_to_decode(setup, tmp_path, tile):
    from lm4lv_core.config import GenerationConfig
    from lm4lv_core.data.format import find_image_problems
    from lm4lv_core.data.outputs import plan_restore
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.model.restore import image_config, restore_items, restore_samples

    inp = tmp_path / "in"
    inp.mkdir()
    for i, seed in enumerate([5, 6, 7, 8]):
        _picture(24, 20, seed).save(inp / f"{i}.png")
    bad = _cut_jpeg(inp / "1.png", inp / "1b.jpg")  # between 1.png and 2.png: in the middle of a batch
    items = plan_restore([inp], tmp_path / "out")
    assert find_image_problems(restore_samples(items, PROMPT)) == []  # the check before the workers passes it
    model = LM4LV.from_pretrained(setup / "run" / "final")
    failed, counted = [], []
    restore_items(model, items, tmp_path / "out", PROMPT, cfg=image_config(GenerationConfig(tile=tile)),
                  batch_size=3, on_batch=lambda n: counted.append(n),
                  on_failure=lambda it, reason: failed.append((it.src, reason)))
    assert [(src, reason.split(" (")[0]) for src, reason in failed] == [(str(bad), "cannot read image")]
    assert sorted(_outputs(tmp_path / "out")) == ["0.png", "1.png", "2.png", "3.png"]
    assert sum(counted) == 4  # every written image counted once
    with pytest.raises(LM4LVError, match="1b.jpg"):  # without on_failure the first failure stops it
        restore_items(model, items, tmp_path / "again", PROMPT, cfg=image_config(GenerationConfig(tile=tile)))


def test_restore_items_isolates_a_failure_after_decoding_and_stops_on_one_not_the_images(setup, tmp_path,
                                                                                         monkeypatch):
    import lm4lv_core.image.io as image_io
    from lm4lv_core.data.outputs import plan_restore
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.model.restore import restore_items

    inp = tmp_path / "in"
    inp.mkdir()
    for i, seed in enumerate([5, 6, 7, 8, 9]):
        _picture(24, 20, seed).save(inp / f"{i}.png")
    items = plan_restore([inp], tmp_path / "out")
    model = LM4LV.from_pretrained(setup / "run" / "final")
    size_of = image_io.oriented_size

    def flaky(path):  # fails after the image was read: while sizing its restored image
        if Path(path).name == "3.png":
            raise LM4LVError(f"{path}: vanished")
        return size_of(path)

    monkeypatch.setattr(image_io, "oriented_size", flaky)
    failed, counted = [], []
    restore_items(model, items, tmp_path / "out", PROMPT, batch_size=2, on_batch=lambda n: counted.append(n),
                  on_failure=lambda it, reason: failed.append((Path(it.src).name, reason)))
    assert failed == [("3.png", "vanished")]
    assert sorted(_outputs(tmp_path / "out")) == ["0.png", "1.png", "2.png", "4.png"] and sum(counted) == 4

    monkeypatch.setattr(image_io, "oriented_size", lambda path: (_ for _ in ()).throw(LM4LVError("no GPU left")))
    with pytest.raises(LM4LVError, match="no GPU left"):  # not an image's own failure: it stops
        restore_items(model, items, tmp_path / "other", PROMPT, batch_size=2, on_failure=lambda *a: None)
    assert _outputs(tmp_path / "other") == {}
