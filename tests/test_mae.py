"""ft-mae and recon-mae on the tiny preset."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import _skimage_rgb
from lm4lv_cli.app import app

runner = CliRunner()
TRAIN = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
HELD_OUT = ("retina", "camera")


def _images(root, names, size=48):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(_skimage_rgb(n, size)).save(root / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("mae")
    return _images(base / "train", TRAIN), _images(base / "held", HELD_OUT)


def _ft(args):
    res = runner.invoke(app, ["ft-mae", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


def _recon(images, out, *args):
    res = runner.invoke(app, ["recon-mae", str(images), "--out", str(out), *map(str, args)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "recon.json").read_text())


def test_ft_mae_improves_held_out_psnr_and_reloads(folders, tmp_path):
    train, held = folders
    _ft([train, "--out", tmp_path / "base", "--preset", "tiny", "--max-steps", 0])
    _ft([train, "--out", tmp_path / "run", "--preset", "tiny", "--lpips-weight", 0, "--max-steps", 120,
         "--micro-batch", 6, "--lr", 3e-3, "--warmup-ratio", 0.05, "--save-every", 60])
    run = tmp_path / "run"
    for name in ("metrics.csv", "loss.png", "config.yaml", "final/config.json", "final/model.safetensors"):
        assert (run / name).is_file(), name
    import csv

    from test_lr_schedule import reference_lrs

    with open(run / "metrics.csv", newline="") as f:  # the default schedule, as in lm4lv train
        assert [float(r["lr"]) for r in csv.DictReader(f)] == pytest.approx(reference_lrs(120, 0.05, 3e-3), rel=1e-5)
    before = _recon(held, tmp_path / "r0", "--mae", tmp_path / "base" / "final")
    after = _recon(held, tmp_path / "r1", "--mae", run / "final")
    assert after["mean"]["psnr"] >= before["mean"]["psnr"] + 2.0, (before["mean"], after["mean"])
    # the saved folder is a plain ViTMAEForPreTraining holding the trained decoder
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining.from_pretrained(run / "final")
    ckpt = load_file(str(run / "checkpoints" / "step-120" / "trainable.safetensors"))
    assert ckpt and all(k.startswith("decoder.") for k in ckpt)
    for k, v in ckpt.items():
        assert torch.equal(hf.get_submodule("decoder").state_dict()[k[len("decoder.decoder."):]], v), k
    # encoder untouched
    base = ViTMAEForPreTraining.from_pretrained(tmp_path / "base" / "final")
    for (k, a), b in zip(hf.vit.state_dict().items(), base.vit.state_dict().values()):
        assert torch.equal(a, b), k
    # reconstructing again from the folder gives identical images
    again = _recon(held, tmp_path / "r2", "--mae", run / "final")
    assert again["images"] == after["images"]


def test_ft_mae_resume_matches_straight_run(folders, tmp_path):
    train, _ = folders
    common = ["--preset", "tiny", "--lpips-weight", 0, "--max-steps", 6, "--micro-batch", 2, "--save-every", 3]
    _ft([train, "--out", tmp_path / "straight", *common])
    _ft([train, "--out", tmp_path / "split", *common, "--stop-after", 3])
    assert not (tmp_path / "split" / "final").exists()
    _ft([train, "--out", tmp_path / "split", "--resume"])
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_ft_mae_with_lpips_weights_file(folders, tmp_path):
    """LPIPS is VGG16-based by default (the reference's perceptual loss); a random torchvision
    vgg16 backbone state dict (its ``features.*``) stands in for the ImageNet weights."""
    from torchvision.models.vgg import cfgs, make_layers

    train, _ = folders
    torch.manual_seed(0)
    weights = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, weights)
    _ft([train, "--out", tmp_path / "run", "--preset", "tiny", "--max-steps", 2, "--micro-batch", 2,
         "--lpips-weights", weights])
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert float(rows[-1].split(",")[header.index("lpips")]) > 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["mae"]["lpips_net"] == "vgg"


def test_missing_lpips_weights_is_a_clear_error_before_anything_is_written(folders, tmp_path, monkeypatch):
    train, _ = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    proc = subprocess.run([sys.executable, "-m", "lm4lv_cli.app", "ft-mae", str(train), "--out",
                           str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "vgg16-397923af.pth" in err[0] and "--lpips-weights" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_workers_ft_mae_and_recon(folders, tmp_path):
    train, held = folders
    res = _ft([train, "--out", tmp_path / "run", "--preset", "tiny", "--lpips-weight", 0, "--max-steps", 2,
               "--micro-batch", 2, "--nproc", 2])
    assert "done" in res.output and "stopped" not in res.output  # launched workers report like one
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["world_size"] == 2
    rep = _recon(held, tmp_path / "rec", "--mae", tmp_path / "run" / "final", "--nproc", 2, "--batch-size", 1)
    assert sorted(r["name"] for r in rep["images"]) == sorted(f"{n}.png" for n in HELD_OUT)
    assert all((tmp_path / "rec" / f"{n}.png").is_file() for n in HELD_OUT)


def test_recon_mae_refuses_to_write_into_its_input(folders):
    _, held = folders
    res = runner.invoke(app, ["recon-mae", str(held), "--out", str(held / "recon"), "--preset", "tiny"])
    assert res.exit_code != 0 and "must not be the input folder" in str(res.exception)
    assert not (held / "recon").exists()
