"""PSNR / SSIM / LPIPS against independent computations; folder scoring and `lm4lv eval`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from typer.testing import CliRunner

from lm4lv_cli.app import app
from lm4lv_core.image import metrics as M
from lm4lv_core.errors import LM4LVError

runner = CliRunner()


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    gt = np.ascontiguousarray(skimage.data.astronaut()[::4, ::4])  # 128x128
    noise = np.random.default_rng(0).normal(0, 12, gt.shape)
    return gt, np.clip(np.rint(gt + noise), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- independent references


def ref_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] from 8-bit RGB."""
    x = img.astype(np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def ref_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def ref_ssim_2d(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM: 11x11 Gaussian window (sigma 1.5), valid region only."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def filt(img: np.ndarray) -> np.ndarray:
        return np.einsum("ijkl,kl->ij", sliding_window_view(img, (11, 11)), w)

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = filt(a), filt(b)
    va = filt(a * a) - mu_a**2
    vb = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(m.mean())


def crop(x: np.ndarray, c: int) -> np.ndarray:
    return x[c:-c, c:-c] if c else x


# ---------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("border", [0, 4])
def test_psnr_rgb_matches_formula(pair, border):
    gt, pred = pair
    assert M.psnr(gt, pred, crop_border=border) == pytest.approx(
        ref_psnr(crop(gt, border), crop(pred, border)), abs=1e-6)


def test_psnr_y_channel_matches_formula(pair):
    gt, pred = pair
    expect = ref_psnr(ref_y(crop(gt, 4)), ref_y(crop(pred, 4)))
    assert M.psnr(gt, pred, crop_border=4, y_channel=True) == pytest.approx(expect, abs=1e-6)


def test_identical_images_score_100_db_and_ssim_1(pair):
    gt, _ = pair
    assert M.psnr(gt, gt) == 100.0
    assert M.psnr(gt, gt, y_channel=True) == 100.0
    assert M.ssim(gt, gt) == pytest.approx(1.0)


@pytest.mark.parametrize("border", [0, 4])
def test_ssim_rgb_matches_reference(pair, border):
    gt, pred = pair
    a, b = crop(gt, border), crop(pred, border)
    expect = np.mean([ref_ssim_2d(a[..., c], b[..., c]) for c in range(3)])
    assert M.ssim(gt, pred, crop_border=border) == pytest.approx(expect, abs=1e-4)


def test_ssim_y_channel_matches_reference(pair):
    gt, pred = pair
    expect = ref_ssim_2d(ref_y(crop(gt, 4)), ref_y(crop(pred, 4)))
    assert M.ssim(gt, pred, crop_border=4, y_channel=True) == pytest.approx(expect, abs=1e-4)


@pytest.mark.parametrize("border,y", [(0, False), (4, False), (4, True), (0, True)])
@pytest.mark.parametrize("shape", [(128, 128), (37, 61), (11, 300)])
def test_psnr_ssim_equal_scikit_image_to_the_last_bit(border, y, shape):
    """lm4lv's own PSNR / SSIM (no scikit-image at scoring time) give scikit-image's values exactly."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(shape[0] + border)
    gt = rng.integers(0, 256, (shape[0] + 2 * border, shape[1] + 2 * border, 3), dtype=np.uint8)
    pred = np.clip(gt + rng.normal(0, 15, gt.shape), 0, 255).astype(np.uint8)
    a, b = M._prepare(gt, pred, border, y)
    ssim = structural_similarity(a, b, data_range=255, channel_axis=None if y else -1, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, K1=0.01, K2=0.03)
    assert M.ssim(gt, pred, crop_border=border, y_channel=y) == float(ssim)
    assert M.psnr(gt, pred, crop_border=border, y_channel=y) == float(peak_signal_noise_ratio(a, b, data_range=255))


def test_size_mismatch_and_small_images_raise(pair):
    gt, _ = pair
    with pytest.raises(LM4LVError, match="sizes differ"):
        M.psnr(gt, gt[:-1])
    with pytest.raises(LM4LVError, match="too small"):
        M.psnr(gt[:8, :8], gt[:8, :8], crop_border=4)


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def alex_weights(tmp_path_factory) -> Path:
    """A torchvision AlexNet state dict (random init, fixed seed) standing in for ImageNet."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "alex.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_lpips_random_backbone_is_a_usable_loss():
    lp = M.build_lpips("alex", random_backbone=True)
    x = torch.rand(2, 3, 64, 64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    d = lp(y, x)
    assert d.shape == (2,) and (d > 0).all()
    assert lp(x, x).abs().max() < 1e-6
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lp.parameters())
    torch.nn.Sequential(lp).train()
    assert not lp.training and not lp.lpips.training  # dropout never switches on


def test_lpips_missing_weights_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(LM4LVError) as exc:
        M.build_lpips("alex")
    msg = str(exc.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg
    assert "--lpips-weights" in msg and "\n" not in msg
    with pytest.raises(LM4LVError, match="vgg16-397923af.pth"):
        M.build_lpips("vgg")
    with pytest.raises(LM4LVError, match="unknown LPIPS network"):
        M.build_lpips("resnet")


def test_lpips_loads_backbone_from_file_and_from_hub_cache(alex_weights, tmp_path, monkeypatch):
    sd = torch.load(alex_weights)
    lp = M.build_lpips("alex", weights=alex_weights)
    assert torch.equal(getattr(lp.lpips.net.slice1, "0").weight, sd["features.0.weight"])
    assert torch.equal(getattr(lp.lpips.net.slice5, "10").bias, sd["features.10.bias"])
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "alexnet-owt-7be5be79.pth").write_bytes(alex_weights.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    lp2 = M.build_lpips("alex")
    assert torch.equal(getattr(lp2.lpips.net.slice3, "6").weight, sd["features.6.weight"])


def test_lpips_bad_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LM4LVError, match="cannot read LPIPS backbone"):
        M.build_lpips("alex", weights=bad)
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(LM4LVError, match="not a torchvision alex backbone"):
        M.build_lpips("alex", weights=bad)


# ---------------------------------------------------------------- folders and CLI


@pytest.fixture()
def folders(tmp_path, pair):
    gt_img, pred_img = pair
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    (gt / "sub").mkdir(parents=True)
    (pred / "sub").mkdir(parents=True)
    Image.fromarray(gt_img).save(gt / "a.png")
    Image.fromarray(pred_img).save(pred / "a.bmp")  # extension differs, same stem
    Image.fromarray(gt_img[:, ::-1]).save(gt / "sub" / "b.png")
    Image.fromarray(gt_img[:, ::-1]).save(pred / "sub" / "b.png")  # identical
    Image.fromarray(gt_img).save(gt / "only_gt.png")
    Image.fromarray(gt_img).save(pred / "sub" / "extra.png")
    return gt, pred


def test_evaluate_folders_pairs_and_reports_unmatched(folders, pair):
    gt, pred = folders
    rep = M.evaluate_paths("psnr,ssim", gt, pred)
    assert [r["name"] for r in rep.rows] == ["a", "sub/b"]
    assert rep.rows[0]["psnr"] == pytest.approx(M.psnr(*pair), abs=1e-9)
    assert rep.rows[1]["psnr"] == 100.0
    assert rep.mean("psnr") == pytest.approx((rep.rows[0]["psnr"] + 100) / 2)
    assert rep.unmatched_gt == ["only_gt.png"] and rep.unmatched_pred == ["sub/extra.png"]


def test_evaluate_errors(folders, tmp_path, pair):
    gt, pred = folders
    with pytest.raises(LM4LVError, match="unknown metric"):
        M.evaluate_paths("fid", gt, pred)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LM4LVError, match="no image"):
        M.evaluate_paths("psnr", gt, tmp_path / "empty")
    with pytest.raises(LM4LVError, match="both be files or both be folders"):
        M.evaluate_paths("psnr", gt, pred / "a.bmp")
    Image.fromarray(pair[0][:100]).save(tmp_path / "small.png")
    with pytest.raises(LM4LVError, match="--resize-to-smaller"):
        M.evaluate_paths("psnr", gt / "a.png", tmp_path / "small.png")
    rep = M.evaluate_paths("psnr", gt / "a.png", tmp_path / "small.png", resize_to_smaller=True)
    resized = np.asarray(Image.fromarray(pair[0]).resize((128, 100), Image.Resampling.BICUBIC))
    assert rep.rows[0]["psnr"] == pytest.approx(ref_psnr(crop(resized, 4), crop(pair[0][:100], 4)),
                                                abs=1e-6)


def test_cli_eval_writes_json_and_csv(folders, tmp_path):
    gt, pred = folders
    res = runner.invoke(app, ["eval", "psnr", str(gt), str(pred), "--json",
                              str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
                              "--crop-border", "0", "--y-channel"])
    assert res.exit_code == 0, res.output
    assert "PSNR ↑" in res.output and "only_gt.png" in res.output and "sub/extra.png" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["count"] == 2 and data["settings"]["y_channel"] is True
    assert data["settings"]["crop_border"] == 0
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["name"] for r in rows] == ["a", "sub/b"]
    assert float(rows[1]["psnr"]) == 100.0
    assert data["mean"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))


def test_cli_eval_lpips_with_weights_file(folders, alex_weights, tmp_path):
    gt, pred = folders
    res = runner.invoke(app, ["eval", "lpips", str(gt), str(pred), "--lpips-weights",
                              str(alex_weights), "--json", str(tmp_path / "l.json")])
    assert res.exit_code == 0, res.output
    assert "LPIPS ↓" in res.output  # lower is better
    rows = json.loads((tmp_path / "l.json").read_text())["images"]
    assert rows[0]["lpips"] > 0 and rows[1]["lpips"] == pytest.approx(0, abs=1e-6)


def test_cli_eval_errors_are_one_line(folders, tmp_path):
    gt, pred = folders
    env_home = tmp_path / "th"
    proc = subprocess.run(
        [sys.executable, "-m", "lm4lv_cli.app", "eval", "lpips", str(gt), str(pred)],
        capture_output=True, text=True, env={"TORCH_HOME": str(env_home), "PATH": "/usr/bin"},
        timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--lpips-weights" in lines[0]
    res = runner.invoke(app, ["eval", "psnr", str(gt / "a.png"), str(tmp_path / "nope.png")])
    assert res.exit_code != 0 and isinstance(res.exception, LM4LVError)


def test_lpips_backbone_file_names_and_cache_dir_match_torch():
    """The names and the folder are known without importing torchvision / torch; they must agree."""
    import os

    import torch
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    assert M.lpips_backbone_file("alex") == os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)
    assert M.lpips_backbone_file("vgg") == os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    assert M.lpips_cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"


def test_eval_psnr_ssim_imports_neither_torch_nor_scikit_image(tmp_path):
    """`lm4lv eval psnr,ssim` (workers included) starts without torch, transformers or scikit-image."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(gt / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(pred / f"{i}.png")
    probe = ("import sys, atexit\n"
             "from lm4lv_cli.app import main\n"
             "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'transformers', 'deepspeed', "
             "'skimage', 'torchvision', 'lpips') if m in sys.modules)))\n"
             "sys.argv = ['lm4lv', 'eval', 'psnr,ssim', sys.argv[1], sys.argv[2], '--workers', '1']\n"
             "main()\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(gt), str(pred)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
