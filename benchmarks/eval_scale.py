"""``lm4lv eval`` / ``make-data`` / ``generate --input`` at scale: speed against a plain loop, and
peak memory that stays flat in the number of images. Prints one JSON object (last on stdout).

    python benchmarks/eval_scale.py [--pairs 300] [--size 128] [--workers N] [--cmd-pairs 1500]
        [--cmd-size 256] [--rss-small 1000] [--rss-large 20000] [--gen-small 20] [--gen-large 200]
        [--skip-generate] [--out DIR]

* ``speed``: images/s of ``lm4lv eval psnr,ssim,lpips`` with 1 and N workers (the whole command, its
  imports and process start-up included) and of a plain single-process loop over the same pairs
  (Pillow + scikit-image + the ``lpips`` package's ``LPIPS(pnet_rand=True)``, imports excluded), and
  their ratio. LPIPS runs offline with a random AlexNet backbone given as ``--lpips-weights``.
* ``command``: seconds of the whole ``lm4lv eval psnr,ssim`` (N workers) on ``--cmd-pairs`` pairs of
  ``--cmd-size`` px against the plain loop run as its own script (imports included); the figure is
  ``ratio`` = lm4lv / plain (target <= 1/1.5).
* ``rss``: peak RSS (MiB, the largest process) of ``eval psnr,ssim --workers 1``, ``make-data`` and
  ``generate --input`` (tiny preset) at a small and a large number of small images; ``ratio`` =
  large / small (target <= 1.2).

Both sides of every ratio run in this one invocation, one after the other, so a busy shared
machine disturbs them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LM4LV = str(Path(sys.executable).parent / "lm4lv")
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

PLAIN = r'''
import sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
gt_dir, pred_dir, lp = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
if lp:
    import torch, lpips
    torch.set_num_threads(1)
    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
t0 = time.perf_counter()
n = 0
for g in sorted(gt_dir.glob("*.png")):
    a = np.asarray(Image.open(g).convert("RGB"))[4:-4, 4:-4]
    b = np.asarray(Image.open(pred_dir / g.name).convert("RGB"))[4:-4, 4:-4]
    peak_signal_noise_ratio(a, b, data_range=255)
    structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=255, channel_axis=-1,
                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if lp:
        ta = torch.from_numpy(a / 255.0).permute(2, 0, 1)[None].float()
        tb = torch.from_numpy(b / 255.0).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            net(tb, ta, normalize=True)
    n += 1
print(n / (time.perf_counter() - t0))
'''

PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.PIPE, text=True); sys.stderr.write(r.stderr[-2000:] if r.returncode not in (0, 3) else ''); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def write_pairs(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    from PIL import Image
    import skimage.data

    gt, pred = root / "gt", root / "pred"
    gt.mkdir(parents=True, exist_ok=True)
    pred.mkdir(exist_ok=True)
    base = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size * 2, size * 2)))
    rng = np.random.default_rng(seed)
    for i in range(n):
        y, x = rng.integers(0, size, 2)
        clean = base[y:y + size, x:x + size]
        noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(clean).save(gt / f"{i:06d}.png", compress_level=1)
        Image.fromarray(noisy).save(pred / f"{i:06d}.png", compress_level=1)
    return gt, pred


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def peak_mib(cmd: list[str]) -> float:
    r = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=ENV, capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--cmd-pairs", type=int, default=1500)
    ap.add_argument("--cmd-size", type=int, default=256)
    ap.add_argument("--rss-small", type=int, default=1000)
    ap.add_argument("--rss-large", type=int, default=20000)
    ap.add_argument("--gen-small", type=int, default=20)
    ap.add_argument("--gen-large", type=int, default=200)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="lm4lv-eval-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count()}, "args": {k: str(v) for k, v in vars(a).items()}}

    # --- speed: psnr,ssim,lpips
    import torch
    import torchvision

    weights = root / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    gt, pred = write_pairs(root / "speed", a.pairs, a.size)
    plain = float(subprocess.run([sys.executable, "-c", PLAIN, str(gt), str(pred), "1"], env=ENV,
                                 capture_output=True, text=True, check=True).stdout.split()[-1])
    speed = {"plain_loop_images_per_s": plain}
    for w in sorted({1, a.workers}):
        s = timed([LM4LV, "eval", "psnr,ssim,lpips", str(gt), str(pred), "--workers", str(w),
                   "--lpips-weights", str(weights), "--device", "cpu"])
        speed[f"lm4lv_{w}_workers_images_per_s"] = a.pairs / s
        speed[f"ratio_{w}_workers"] = a.pairs / s / plain
    res["speed_psnr_ssim_lpips"] = speed

    # --- the whole command psnr,ssim vs the plain loop as a script
    gt, pred = write_pairs(root / "cmd", a.cmd_pairs, a.cmd_size)
    t_plain = timed([sys.executable, "-c", PLAIN, str(gt), str(pred), "0"])
    t_cmd = timed([LM4LV, "eval", "psnr,ssim", str(gt), str(pred), "--workers", str(a.workers)])
    res["command_psnr_ssim"] = {"pairs": a.cmd_pairs, "size": a.cmd_size, "plain_s": t_plain, "lm4lv_s": t_cmd,
                                "ratio": t_cmd / t_plain}

    # --- peak RSS, small vs large
    rss: dict = {}
    for n in (a.rss_small, a.rss_large):
        g, p = write_pairs(root / f"rss{n}", n, 24)
        rss.setdefault("eval", {})[n] = peak_mib([LM4LV, "eval", "psnr,ssim", str(g), str(p), "--workers", "1",
                                                  "--crop-border", "0", "--csv", str(root / f"rss{n}.csv")])
        rss.setdefault("make_data", {})[n] = peak_mib([LM4LV, "make-data", str(g), "-o", str(root / f"ds{n}"),
                                                       "-d", "noise:sigma=10", "--size", "24"])
    if not a.skip_generate:
        from lm4lv_core.model.lm4lv import LM4LV as Model
        from lm4lv_core.sources.presets import preset_config

        Model.from_config(preset_config("tiny", restore_prompt="<image> <task>")).save_pretrained(root / "model")
        for n in (a.gen_small, a.gen_large):
            g, _ = write_pairs(root / f"gen{n}", n, 24)
            rss.setdefault("generate_input", {})[n] = peak_mib(
                [LM4LV, "generate", "--run", str(root / "model"), "--input", str(g), "-o", str(root / f"restored{n}")])
    for k, v in rss.items():
        lo, hi = sorted(v)
        v["ratio"] = v[hi] / v[lo]
    res["peak_rss_mib"] = rss
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
