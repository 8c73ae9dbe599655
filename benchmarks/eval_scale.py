"""``lm4lv eval`` / ``make-data`` / ``generate --input`` at scale: speed against a plain loop, and
peak memory that stays flat in the number of images. Prints one JSON object (last on stdout).

    python benchmarks/eval_scale.py [--pairs 300] [--size 128] [--workers N] [--cmd-pairs 1500]
        [--cmd-size 256] [--rss-small 1000] [--rss-large 20000] [--gen-small 20] [--gen-large 200]
        [--repeats 1] [--skip-speed] [--skip-generate] [--skip-rss] [--out DIR]

The plain loop is a single-process script over the same pairs: Pillow + scikit-image
(``peak_signal_noise_ratio``, ``structural_similarity`` with the Gaussian 11x11 window, sigma 1.5) and,
for LPIPS, the ``lpips`` package's ``LPIPS(net="alex", pnet_rand=True)`` (offline; lm4lv gets the
same random AlexNet backbone as ``--lpips-weights``). Every speed figure is measured two ways, and
both are reported:

* ``process``: wall time of a whole subprocess, imports, worker start-up and LPIPS construction
  included, on both sides (``lm4lv eval ...`` vs ``python plain_loop.py``);
* ``steady``: scoring only, on both sides: the plain loop times its loop after its imports and
  LPIPS construction; lm4lv times ``Scorer.score`` (what ``lm4lv eval`` runs) after a warm-up call
  that started its workers and built LPIPS in each.

Sections: ``speed_psnr_ssim_lpips`` (``--pairs`` of ``--size`` px, 1 and ``--workers`` workers;
figure: images/s of lm4lv / images/s of the plain loop, target >= 1.7 with 2 workers),
``command_psnr_ssim`` (``--cmd-pairs`` of ``--cmd-size`` px, ``--workers`` workers; figure: lm4lv
seconds / plain seconds, target <= 1/1.5), ``peak_rss_mib`` (the largest process's peak RSS of
``eval psnr,ssim --workers 1``, ``make-data`` and ``generate --input`` at a small and a large number
of small images; ``ratio`` = large / small, target <= 1.2). With ``--repeats R`` each timing is
taken R times, the two sides alternating, and the median is reported (all runs are listed).
Both sides of every ratio run in this one invocation, so a busy shared machine disturbs them alike.
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
# OMP_NUM_THREADS=1 on both sides: the plain loop runs torch on one thread, and so do lm4lv's
# workers; one process per core is what both sides are compared at
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

PLAIN = r'''
import time
t_start = time.perf_counter()
import sys
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
t1 = time.perf_counter()
print(n / (t1 - t0), n / (t1 - t_start))  # steady images/s, images/s since the interpreter ran this
'''

STEADY = r'''
import json, sys, time
from pathlib import Path
from lm4lv_core.image.scoring import Scorer
metrics, gt_dir, pred_dir, workers, weights = sys.argv[1].split(","), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pairs = [(g, pred_dir / g.name) for g in sorted(gt_dir.glob("*.png"))]
settings = {"crop_border": 4, "y_channel": False, "resize_to_smaller": False}
opts = {"lpips_weights": weights, "device": "cpu"} if "lpips" in metrics else {}
if __name__ == "__main__":
    with Scorer(metrics, settings, workers=workers, **opts) as s:
        s.score(pairs[:8 * workers])  # warm-up: workers started, LPIPS built in each
        t0 = time.perf_counter()
        rows = s.score(pairs)
        print(len(rows) / (time.perf_counter() - t0))
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


def run_out(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of a subprocess and its stdout's last line."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    lines = r.stdout.strip().splitlines()
    return dt, lines[-1] if lines else ""


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def peak_mib(cmd: list[str]) -> float:
    r = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=ENV, capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def measure_speed(a: argparse.Namespace, root: Path, res: dict) -> None:
    """The speed figures (see the module docstring) into ``res``."""
    reps = max(1, a.repeats)
    # --- speed: psnr,ssim,lpips
    import torch
    import torchvision

    weights = root / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    gt, pred = write_pairs(root / "speed", a.pairs, a.size)
    counts = sorted({1, a.workers})
    runs: dict = {"plain_process_s": [], "plain_steady_images_per_s": []}
    for w in counts:
        runs[f"lm4lv_{w}_process_s"], runs[f"lm4lv_{w}_steady_images_per_s"] = [], []
    for _ in range(reps):  # the sides alternate, so a change of load hits them alike
        dt, out = run_out([sys.executable, "-c", PLAIN, str(gt), str(pred), "1"])
        runs["plain_process_s"].append(dt)
        runs["plain_steady_images_per_s"].append(float(out.split()[0]))
        for w in counts:
            dt, _ = run_out([LM4LV, "eval", "psnr,ssim,lpips", str(gt), str(pred), "--workers", str(w),
                             "--lpips-weights", str(weights), "--device", "cpu"])
            runs[f"lm4lv_{w}_process_s"].append(dt)
            _, out = run_out([sys.executable, "-c", STEADY, "psnr,ssim,lpips", str(gt), str(pred), str(w), str(weights)])
            runs[f"lm4lv_{w}_steady_images_per_s"].append(float(out))
    plain_proc = a.pairs / median(runs["plain_process_s"])
    plain_steady = median(runs["plain_steady_images_per_s"])
    speed: dict = {"pairs": a.pairs, "size": a.size,
                   "process": {"plain_loop_images_per_s": plain_proc},
                   "steady": {"plain_loop_images_per_s": plain_steady}}
    for w in counts:
        proc = a.pairs / median(runs[f"lm4lv_{w}_process_s"])
        steady = median(runs[f"lm4lv_{w}_steady_images_per_s"])
        speed["process"][f"lm4lv_{w}_workers_images_per_s"] = proc
        speed["process"][f"ratio_{w}_workers"] = proc / plain_proc
        speed["steady"][f"lm4lv_{w}_workers_images_per_s"] = steady
        speed["steady"][f"ratio_{w}_workers"] = steady / plain_steady
    speed["runs"] = runs
    res["speed_psnr_ssim_lpips"] = speed

    # --- the whole command psnr,ssim vs the plain loop as a script (both: subprocess, imports included)
    gt, pred = write_pairs(root / "cmd", a.cmd_pairs, a.cmd_size)
    runs = {"plain_s": [], "lm4lv_s": [], "plain_steady_images_per_s": [], "lm4lv_steady_images_per_s": []}
    for _ in range(reps):
        dt, out = run_out([sys.executable, "-c", PLAIN, str(gt), str(pred), "0"])
        runs["plain_s"].append(dt)
        runs["plain_steady_images_per_s"].append(float(out.split()[0]))
        dt, _ = run_out([LM4LV, "eval", "psnr,ssim", str(gt), str(pred), "--workers", str(a.workers)])
        runs["lm4lv_s"].append(dt)
        _, out = run_out([sys.executable, "-c", STEADY, "psnr,ssim", str(gt), str(pred), str(a.workers), "-"])
        runs["lm4lv_steady_images_per_s"].append(float(out))
    t_plain, t_cmd = median(runs["plain_s"]), median(runs["lm4lv_s"])
    s_plain, s_cmd = median(runs["plain_steady_images_per_s"]), median(runs["lm4lv_steady_images_per_s"])
    res["command_psnr_ssim"] = {
        "pairs": a.cmd_pairs, "size": a.cmd_size, "workers": a.workers,
        "process": {"plain_s": t_plain, "lm4lv_s": t_cmd, "ratio": t_cmd / t_plain},
        "steady": {"plain_images_per_s": s_plain, "lm4lv_images_per_s": s_cmd, "time_ratio": s_plain / s_cmd},
        "runs": runs}


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
    ap.add_argument("--repeats", type=int, default=1, help="take every timing R times (median reported)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="measure peak memory only")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="lm4lv-eval-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count()}, "args": {k: str(v) for k, v in vars(a).items()}}

    if not a.skip_speed:
        measure_speed(a, root, res)
    if a.skip_rss:
        print(json.dumps(res, indent=1))
        return

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
