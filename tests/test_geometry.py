"""Image geometry: the stretch / crop size policies of make-data, train and generate, and the size
generated images are written at (``--output-size``)."""

from __future__ import annotations

import dataclasses

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import yaml

from lm4lv_core.config import thawed
from PIL import Image
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.data.dataset import image_to_tensor
from lm4lv_core.errors import ConfigError
from lm4lv_core.image.io import load_rgb, oriented_size, restored_size, to_square

runner = CliRunner()
W, H = 56, 40  # a landscape input; the tiny preset's model size is 32


def _photo(path: Path, name: str = "coffee", size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize(size, Image.Resampling.BICUBIC).save(path)
    return path


def _lm4lv(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lm4lv_cli.app import main

    monkeypatch.setattr(sys, "argv", ["lm4lv", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------- the policies
def test_stretch_is_the_references_resize_and_crop_keeps_the_centre(tmp_path):
    src = load_rgb(_photo(tmp_path / "p.png"))
    stretched = np.asarray(to_square(src, 32))
    # the reference's loader: convert('RGB').resize((size, size), BICUBIC), whatever the aspect ratio
    np.testing.assert_array_equal(stretched, np.asarray(src.resize((32, 32), Image.Resampling.BICUBIC)))
    cropped = np.asarray(to_square(src, 32, "crop"))
    np.testing.assert_array_equal(cropped, np.asarray(src.resize((45, 32), Image.Resampling.BICUBIC))[:, 6:38])
    assert not np.array_equal(stretched, cropped)
    assert to_square(src, 0) is src
    # the model input follows the same policy
    torch.testing.assert_close(image_to_tensor(src, 32), torch.from_numpy(stretched.copy()).permute(2, 0, 1) / 255.0)
    assert restored_size((W, H), "stretch") == (W, H) and restored_size((W, H), "crop") == (H, H)
    with pytest.raises(ConfigError, match="--resize must be one of stretch, crop, got 'fit'"):
        to_square(src, 32, "fit")


def test_oriented_size_applies_exif_rotation(tmp_path):
    im = Image.fromarray(skimage.data.coffee()).resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert oriented_size(tmp_path / "r.jpg") == load_rgb(tmp_path / "r.jpg").size == (40, 60)


# ---------------------------------------------------------------------------- make-data
def test_make_data_stretches_by_default_and_crops_on_request(tmp_path):
    clean = tmp_path / "clean"
    src = load_rgb(_photo(clean / "coffee.jpg"))
    for resize in (None, "crop"):
        out = tmp_path / (resize or "default")
        args = ["make-data", str(clean), "--out", str(out), "-d", "noise:sigma=20", "--size", "32",
                "--test-fraction", "0"] + (["--resize", resize] if resize else [])
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        hq, lq = _png(out / "hq" / "coffee.png"), _png(out / "lq" / "noise_sigma20" / "coffee.png")
        assert hq.shape == lq.shape == (32, 32, 3)
        np.testing.assert_array_equal(hq, np.asarray(to_square(src, 32, resize or "stretch")))
        man = json.loads((out / "manifest.json").read_text())
        assert man["resize"] == (resize or "stretch") and "SIZE x SIZE" in man["size_policy"]
    assert not np.array_equal(_png(tmp_path / "default" / "hq" / "coffee.png"),
                              _png(tmp_path / "crop" / "hq" / "coffee.png"))


def test_bad_resize_is_a_one_line_error_of_the_installed_script(tmp_path):
    clean = tmp_path / "clean"
    _photo(clean / "a.png")
    exe = shutil.which("lm4lv") or str(Path(sys.executable).with_name("lm4lv"))
    proc = subprocess.run([exe, "make-data", str(clean), "--out", str(tmp_path / "d"), "-d", "noise",
                           "--resize", "fit"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err == ["error: --resize must be one of stretch, crop, got 'fit'"]
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------- train + generate
@pytest.fixture(scope="module")
def cropped_run(tmp_path_factory):
    """Non-square noisy/clean pairs, a one-step training run with ``--resize crop`` and a
    generation file over the same inputs."""
    root = tmp_path_factory.mktemp("geometry")
    names = ("coffee", "chelsea")
    samples, test = [], []
    (root / "lq").mkdir()
    for i, name in enumerate(names):
        _photo(root / "hq" / f"{i}.png", name)
        noisy = np.clip(_png(root / "hq" / f"{i}.png") + np.random.default_rng(i).normal(0, 30, (H, W, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(root / "lq" / f"{i}.png")
        samples.append({"image": [f"lq/{i}.png", f"hq/{i}.png"],
                        "conversations": [{"from": "human", "value": "<image> <task>"},
                                          {"from": "gpt", "value": "<image>"}]})
        test.append({"image": [f"lq/{i}.png"], "target": f"hq/{i}.png",
                     "conversations": [{"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]})
    (root / "train.json").write_text(json.dumps(samples))
    (root / "test.json").write_text(json.dumps(test))
    res = runner.invoke(app, ["train", "--data", str(root / "train.json"), "--out", str(root / "run"),
                              "--preset", "tiny", "--max-steps", "1", "--micro-batch", "2", "--resize", "crop"])
    assert res.exit_code == 0, res.output
    return root


def test_train_records_the_resize_mode_and_feeds_cropped_images(cropped_run):
    from lm4lv_core.config import from_dict
    from lm4lv_core.jobs.train import TrainJob
    from lm4lv_core.tasks.lm4lv import LM4LVTask

    saved = yaml.safe_load((cropped_run / "run" / "config.yaml").read_text())
    assert saved["model"]["resize"] == "crop"
    assert yaml.safe_load((cropped_run / "run" / "final" / "lm4lv.yaml").read_text())["resize"] == "crop"
    job = from_dict(TrainJob, saved)
    task = LM4LVTask(job.train, job.model)
    task.build_model()
    item = task.dataset()[0]
    expect = [image_to_tensor(load_rgb(cropped_run / d / "0.png"), 32, "crop") for d in ("lq", "hq")]
    torch.testing.assert_close(item.pixels, torch.stack(expect), rtol=0, atol=0)
    assert not torch.equal(item.pixels[0], image_to_tensor(load_rgb(cropped_run / "lq" / "0.png"), 32))


def test_generate_uses_the_runs_mode_and_writes_the_input_size(cropped_run, tmp_path, monkeypatch, capsys):
    run, data = cropped_run / "run", cropped_run / "test.json"

    def gen(out, *extra):
        code, log = _lm4lv(monkeypatch, capsys, "generate", "--run", run, "--data", data, "--out", out, *extra)
        assert code == 0, log
        return json.loads((out / "generate.json").read_text())["generation"]

    # the run's crop mode by default: written at the centre square's footprint of the input
    assert gen(tmp_path / "a")["resize"] == "crop"
    assert gen(tmp_path / "m", "--output-size", "model")["output_size"] == "model"
    model_size = _png(tmp_path / "m" / "images" / "0.png")
    assert model_size.shape == (32, 32, 3)
    np.testing.assert_array_equal(_png(tmp_path / "a" / "images" / "0.png"),
                                  np.asarray(Image.fromarray(model_size).resize((H, H), Image.Resampling.BICUBIC)))
    # ... and the model saw the cropped input, not the stretched one
    from lm4lv_core.data.dataset import tensor_to_uint8
    from lm4lv_core.data.format import load_checked
    from lm4lv_core.model.generate import GenerationConfig, generate_samples
    from lm4lv_core.model.lm4lv import LM4LV

    model = LM4LV.from_pretrained(run / "final").eval()
    sample = load_checked(data, mode="generate")[:1]
    for resize, same in (("crop", True), ("stretch", False)):
        out = generate_samples(model, sample, GenerationConfig(resize=resize))[0].images[0]
        assert np.array_equal(tensor_to_uint8(out), model_size) == same, resize
    # --resize overrides the run's mode: stretched in, written back at the input's own size
    assert gen(tmp_path / "s", "--resize", "stretch")["resize"] == "stretch"
    assert _png(tmp_path / "s" / "images" / "1.png").shape == (H, W, 3)
    for opt, val in (("--output-size", "original"), ("--resize", "pad")):
        code, log = _lm4lv(monkeypatch, capsys, "generate", "--run", run, "--data", data, "--out", tmp_path / "bad", opt, val)
        assert code == 2 and f"error: {opt} must be one of" in log and val in log, log
    assert not (tmp_path / "bad").exists()


def test_restore_returns_images_at_their_input_size(tmp_path):
    from lm4lv_core.model.generate import GenerationConfig, build_items, restore
    from lm4lv_core.data.format import parse_sample
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny", restore_prompt="<image> <task>")).eval()
    img = load_rgb(_photo(tmp_path / "p.png"))
    assert [o.size for o in restore(model, [img, img.resize((24, 40))])] == [(W, H), (24, 40)]
    assert restore(model, [img], cfg=GenerationConfig(mode="image", output_size="model"))[0].size == (32, 32)
    assert restore(model, [img], cfg=GenerationConfig(mode="image", resize="crop"))[0].size == (H, H)
    # the model input follows the model's own policy unless the generation config names one
    s = parse_sample({"image": [str(tmp_path / "p.png")], "conversations": [
        {"from": "human", "value": "<image> <task>"}, {"from": "gpt", "value": ""}]}, 0)
    model.config = dataclasses.replace(thawed(model.config), resize="crop")  # a model trained with crop
    items, _ = build_items(model, [s], "image")
    torch.testing.assert_close(items[0].pixels[0], image_to_tensor(img, 32, "crop"), rtol=0, atol=0)
    items, _ = build_items(model, [s], "image", resize="stretch")
    torch.testing.assert_close(items[0].pixels[0], image_to_tensor(img, 32, "stretch"), rtol=0, atol=0)
