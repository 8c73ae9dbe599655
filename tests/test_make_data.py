"""`lm4lv make-data`: layout, JSON format, size policy, reproducibility, pairing, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.image import degrade as D
from lm4lv_core.errors import LM4LVError
from lm4lv_core.jobs.make_data import MakeDataConfig, apply_size_policy, image_rng, make_data

runner = CliRunner()


def small(img: np.ndarray, h: int, w: int) -> Image.Image:
    return Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture()
def clean(tmp_path) -> Path:
    """Clean images in several formats and modes, one in a sub-folder."""
    root = tmp_path / "clean"
    (root / "sub").mkdir(parents=True)
    small(skimage.data.astronaut(), 96, 96).save(root / "astro.png")
    small(skimage.data.coffee(), 80, 120).save(root / "sub" / "coffee.jpg", quality=95)
    small(skimage.data.chelsea(), 90, 120).convert("P").save(root / "chelsea_palette.png")
    small(skimage.data.camera(), 72, 72).save(root / "camera_gray.tiff")
    rgba = small(skimage.data.astronaut(), 70, 70).convert("RGBA")
    rgba.save(root / "sub" / "rgba.webp", lossless=True)
    cam16 = (np.asarray(small(skimage.data.camera(), 68, 68)).astype(np.uint16) * 257)
    Image.fromarray(cam16).save(root / "camera16.png")
    small(skimage.data.coffee(), 66, 99).convert("RGB").save(root / "img.bmp")
    return root


def run(args: list[str]):
    res = runner.invoke(app, ["make-data", *map(str, args)])
    return res


def load(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_builds_layout_json_and_manifest(clean, tmp_path):
    out = tmp_path / "data"
    res = run([clean, "--out", out, "-d", "blur:sigma=2+noise:sigma=15", "-d", "jpeg:quality=20",
               "--size", 64, "--seed", 3, "--test-fraction", 0.3])
    assert res.exit_code == 0, res.output
    keys = ["astro.png", "camera16.png", "camera_gray.png", "chelsea_palette.png", "img.png",
            "sub/coffee.png", "sub/rgba.png"]
    files = tree(out)
    for k in keys:
        assert f"hq/{k}" in files
        assert f"lq/blur_sigma2+noise_sigma15/{k}" in files and f"lq/jpeg_quality20/{k}" in files
        assert load(out / "hq" / k).shape == (64, 64, 3)
    assert {"train.json", "test.json", "manifest.json"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]

    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "test.json").read_text())
    assert len(train) + len(test) == 2 * len(keys) and len(test) == 2 * 2  # round(0.3*7)=2
    for s in train:
        assert s["task_type"] == "conversation"
        assert s["conversations"] == [{"from": "human", "value": "<image> <task>"},
                                      {"from": "gpt", "value": "<image>"}]
        lq, hq = s["image"]
        assert Path(lq).is_absolute() and Path(lq).is_file() and Path(hq).is_file()
        assert Path(lq).relative_to(out / "lq").parts[1:] == Path(hq).relative_to(out / "hq").parts
    for s in test:
        assert len(s["image"]) == 1 and Path(s["image"][0]).is_file()
        assert s["conversations"][-1] == {"from": "gpt", "value": ""}
        assert Path(s["target"]).is_file()
    test_hq = {s["target"] for s in test}
    assert not test_hq & {s["image"][1] for s in train}  # split by clean image

    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == 3 and man["size"] == 64 and man["test_fraction"] == 0.3
    assert man["degradations"][0]["steps"][1] == {"name": "noise",
                                                   "params": {"sigma": 15.0, "gray": False}}
    assert man["degradations"][1]["folder"] == "lq/jpeg_quality20"
    assert {"lm4lv", "numpy", "pillow", "python"} <= set(man["versions"])
    assert man["counts"]["test_images"] == 2


def test_lq_equals_degradation_of_hq_with_documented_seed(clean, tmp_path):
    out = tmp_path / "data"
    assert run([clean, "-o", out, "-d", "noise:sigma=25", "--size", 64, "--seed", 5,
                "--test-fraction", 0]).exit_code == 0
    hq = load(out / "hq" / "astro.png")
    lq = load(out / "lq" / "noise_sigma25" / "astro.png")
    expect = D.add_noise(hq, image_rng(5, "astro.png", 0), sigma=25)
    np.testing.assert_array_equal(lq, expect)
    assert abs((lq.astype(float) - hq).std() - 25) < 2


def test_size_policy_resize_shorter_side_then_centre_crop(clean, tmp_path):
    src = Image.open(clean / "sub" / "coffee.jpg").convert("RGB")  # 120x80
    expect = np.asarray(src.resize((96, 64), Image.Resampling.BICUBIC))[:, 16:80]
    np.testing.assert_array_equal(apply_size_policy(src, 64, "crop"), expect)
    out = tmp_path / "orig"
    assert run([clean, "-o", out, "-d", "rotate", "--size", 0]).exit_code == 0
    assert load(out / "hq" / "sub" / "coffee.png").shape == (80, 120, 3)
    assert load(out / "lq" / "rotate" / "sub" / "coffee.png").shape == (120, 80, 3)
    assert load(out / "hq" / "camera16.png").max() > 200  # 16-bit scaled, not clipped


def test_exif_orientation_is_applied(tmp_path):
    root = tmp_path / "exif"
    root.mkdir()
    im = small(skimage.data.coffee(), 40, 60)  # 60 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(root / "photo.jpg", exif=exif.tobytes(), quality=95)
    out = tmp_path / "data"
    assert run([root, "-o", out, "-d", "flip", "--size", 0]).exit_code == 0
    assert load(out / "hq" / "photo.png").shape == (60, 40, 3)


@pytest.mark.slow
def test_outputs_are_byte_identical_whatever_workers(clean, tmp_path):
    out = tmp_path / "data"
    args = [clean, "-o", out, "-d", "rain+salt_pepper", "-d", "mask:patch=8,ratio=0.5",
            "-d", "noise:sigma=5..30", "--size", 48, "--seed", 11]
    assert run([*args, "--workers", 1]).exit_code == 0
    first = tree(out)
    out.rename(tmp_path / "first")
    res = run([*args, "--workers", 2])
    assert res.exit_code == 0, res.output
    assert tree(out) == first
    other = run([clean, "-o", tmp_path / "seed12", *args[3:-1], 12])
    assert other.exit_code == 0
    lq_key = "lq/rain+salt_pepper/astro.png"
    assert tree(tmp_path / "seed12")["hq/astro.png"] == first["hq/astro.png"]
    assert tree(tmp_path / "seed12")[lq_key] != first[lq_key]


def test_separate_test_dir_and_custom_prompt(clean, tmp_path):
    tdir = tmp_path / "testimgs"
    tdir.mkdir()
    small(skimage.data.chelsea(), 50, 50).save(tdir / "cat.png")
    out = tmp_path / "data"
    res = run([clean, "-o", out, "-d", "downup:factor=2", "--size", 32, "--test-dir", tdir,
               "--prompt", "Restore <image> <task>"])
    assert res.exit_code == 0, res.output
    test = json.loads((out / "test.json").read_text())
    assert [s["image"] for s in test] == [[str(out / "test/lq/downup_factor2/cat.png")]]
    assert test[0]["target"] == str(out / "test/hq/cat.png")
    train = json.loads((out / "train.json").read_text())
    assert len(train) == 7 and train[0]["conversations"][0]["value"] == "Restore <image> <task>"


def test_list_prints_every_degradation():
    res = runner.invoke(app, ["make-data", "--list"])
    assert res.exit_code == 0
    for name in D.REGISTRY:
        assert name in res.output


def test_pairing_mode_reports_unpaired(tmp_path):
    lq, hq = tmp_path / "lq", tmp_path / "hq"
    (lq / "x").mkdir(parents=True)
    (hq / "x").mkdir(parents=True)
    img = small(skimage.data.astronaut(), 32, 32)
    for name in ("a", "b", "c"):
        img.save(hq / "x" / f"{name}.png")
    img.save(lq / "x" / "a.jpg")     # different extension, same relative stem
    img.save(lq / "b.bmp")           # different folder, unique stem
    img.save(lq / "stray.png")       # no partner
    out = tmp_path / "paired"
    res = run(["--lq", lq, "--hq", hq, "-o", out, "--test-fraction", 0])
    assert res.exit_code == 0, res.output
    assert "unpaired LQ" in res.output and "stray.png" in res.output and "x/c.png" in res.output
    train = json.loads((out / "train.json").read_text())
    assert [s["image"] for s in train] == [[str(lq / "b.bmp"), str(hq / "x/b.png")],
                                           [str(lq / "x/a.jpg"), str(hq / "x/a.png")]]
    man = json.loads((out / "manifest.json").read_text())
    assert man["unpaired_lq"] == ["stray.png"] and man["unpaired_hq"] == ["x/c.png"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.json", "train.json"]


def test_pairing_mode_nothing_paired_fails(tmp_path):
    lq, hq = tmp_path / "lq", tmp_path / "hq"
    lq.mkdir()
    hq.mkdir()
    small(skimage.data.astronaut(), 16, 16).save(lq / "a.png")
    small(skimage.data.astronaut(), 16, 16).save(hq / "b.png")
    res = run(["--lq", lq, "--hq", hq, "-o", tmp_path / "out"])
    assert isinstance(res.exception, LM4LVError) and "no image of --lq" in str(res.exception)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_our_entries(clean, tmp_path):
    out = tmp_path / "data"
    assert run([clean, "-o", out, "-d", "noise", "--size", 32]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    res = run([clean, "-o", out, "-d", "blur", "--size", 32])
    assert isinstance(res.exception, LM4LVError) and "--overwrite" in str(res.exception)
    assert run([clean, "-o", out, "-d", "blur", "--size", 32, "--overwrite"]).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "lq").iterdir()) == ["blur"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    res = run([clean, "-o", foreign, "-d", "blur", "--overwrite"])
    assert "no manifest.json" in str(res.exception)
    assert sorted(p.name for p in foreign.iterdir()) == ["x.txt"]


@pytest.mark.parametrize("case", ["unreadable", "unreadable_workers", "empty", "unknown",
                                  "bad_param", "no_degradation", "out_inside_input"])
def test_bad_input_leaves_nothing(clean, tmp_path, case):
    out = tmp_path / "data"
    args = [clean, "-o", out, "-d", "noise", "--size", 32]
    if case.startswith("unreadable"):
        (clean / "sub" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        args += ["--workers", 2] if case.endswith("workers") else []
        needle = "zz_broken.png: cannot read image"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[0] = tmp_path / "empty"
        needle = "no images found"
    elif case == "unknown":
        args[4] = "sharpen"
        needle = "unknown degradation 'sharpen'"
    elif case == "bad_param":
        args[4] = "noise:sigma=-1"
        needle = "must be in [0, 255]"
    elif case == "no_degradation":
        args = args[:3] + args[5:]
        needle = "at least one --degradation"
    else:
        args[2] = clean / "out"
        out = clean / "out"
        needle = "must not be inside"
    res = run(args)
    assert res.exit_code != 0 and isinstance(res.exception, LM4LVError), res.output
    assert needle in str(res.exception) and "\n" not in str(res.exception)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("empty",)) == ["clean"]


def test_subprocess_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "lm4lv_cli.app", "make-data",
                           str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "-d", "noise"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no images found" in lines[0]
    assert not (tmp_path / "out").exists()


def test_config_validation_messages(tmp_path, clean):
    with pytest.raises(LM4LVError, match="test-fraction"):
        MakeDataConfig(out=tmp_path / "o", clean_dir=clean, degradations=["noise"],
                       test_fraction=1.5)
    with pytest.raises(LM4LVError, match="<image> exactly once"):
        MakeDataConfig(out=tmp_path / "o", clean_dir=clean, degradations=["noise"],
                       prompt="<task>")
    with pytest.raises(LM4LVError, match="both --lq and --hq"):
        MakeDataConfig(out=tmp_path / "o", lq_dir=tmp_path)
    with pytest.raises(LM4LVError, match="given twice"):
        make_data(MakeDataConfig(out=tmp_path / "o", clean_dir=clean,
                                 degradations=["noise", "gaussian_noise"]))
