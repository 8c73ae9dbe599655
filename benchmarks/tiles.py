"""Tiled vs resized restoration at 4x the family's size, seams, speed and memory.

The quickstart's held-out pictures (``cat``, ``retina``, ``colorwheel``) at 256 x 256 px, degraded
as the quickstart degrades them (Gaussian noise, sigma 25), are restored through the tiny-64
family's encoder and decoder (``lm4lv recon``'s path: no LLM, so the figures isolate the tiling):

* ``degraded``: the degraded input itself;
* ``resize``: the whole picture resized to the family's 64 px, reconstructed, resized back;
* ``tiled``: ``--tile auto`` (64 px) ``--tile-overlap 16`` at native resolution;

each scored (PSNR / SSIM, 4 px border cropped) against the clean picture. ``seam`` is the seam score
(:func:`lm4lv_core.image.tiles.seam_score`: mean absolute gradient across tile edges over that
across the tiles' patch grid elsewhere) of the tiled result with blending (overlap 16) and without
(overlap 0: tiles abut). ``seconds_per_megapixel``: the tiled path on a 1-megapixel picture.
``peak_rss_mib``: a fresh process restoring a 1- and a 16-megapixel picture tile by tile
(read, tiled, reconstructed, blended, written as PNG; not scored: SSIM of a 16-megapixel image
alone takes gigabytes), its peak resident memory (``ru_maxrss``).

The default tiny-64 MAE is random-initialised (no weights can be downloaded): its reconstructions
are poor, and the numbers show the pipeline, not a trained family. ``--mae FOLDER`` uses another
MAE, e.g. the quickstart's fine-tuned one (``lm4lv-quickstart/mae/final``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiles.py [--mae FOLDER] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256
OVERLAP = 16

_CHILD = """
import resource, sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
from tiles import _parts, _restore_fn
from lm4lv_core.image.io import load_rgb, save_png
from lm4lv_core.image.tiles import Tiling, restore_tiled
spec, enc, dec = _parts(sys.argv[1])
restore_tiled([(sys.argv[3], lambda: np.asarray(load_rgb(sys.argv[2])))], Tiling(enc.image_size, 16),
              _restore_fn(enc, dec), batch=16, on_image=lambda path, px: save_png(px, path))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _parts(mae: str | None):
    from lm4lv_core.config import ModuleSpec
    from lm4lv_core.sources.presets import preset_config
    from lm4lv_core.vision import build_decoder, build_encoder

    spec = ModuleSpec("mae", {"path": mae}) if mae else preset_config("tiny-64").encoder
    return spec, build_encoder(spec).eval(), build_decoder(spec).eval()


def _restore_fn(enc, dec):
    def restore(tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255.0)
        with torch.inference_mode():
            y = dec(enc(x)).float().clamp(0, 1)
        return y.permute(0, 2, 3, 1).numpy()
    return restore


def _resize_path(img: np.ndarray, enc, dec) -> np.ndarray:
    from PIL import Image

    from lm4lv_core.data.dataset import image_to_tensor, tensor_to_uint8

    x = image_to_tensor(Image.fromarray(img), enc.image_size)[None]
    with torch.inference_mode():
        y = tensor_to_uint8(dec(enc(x))[0])
    return np.asarray(Image.fromarray(y).resize((img.shape[1], img.shape[0]), Image.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mae", help="an MAE folder [the tiny-64 preset's, random-initialised]")
    ap.add_argument("--skip-memory", action="store_true", help="skip the 1 / 16 megapixel memory runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from PIL import Image

    from lm4lv_core.image.io import load_rgb
    from lm4lv_core.image.metrics import psnr, ssim
    from lm4lv_core.image.tiles import Tiling, family_patch, plan_tiles, seam_score, tile_image
    from lm4lv_core.jobs.quickstart import export_sample_images

    spec, enc, dec = _parts(args.mae)
    restore = _restore_fn(enc, dec)
    size, patch = enc.image_size, family_patch(enc.num_tokens, enc.image_size)
    blend, abut = Tiling(size, OVERLAP), Tiling(size, 0)
    rng = np.random.default_rng(0)
    rows, seams = {}, {"blended": [], "no_blending": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, held_out = export_sample_images(tmp / "images")
        for f in sorted(held_out.glob("*.png")):
            clean = np.asarray(load_rgb(f).resize((SIZE, SIZE), Image.BICUBIC))
            noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
            outs = {"degraded": noisy, "resize": _resize_path(noisy, enc, dec),
                    "tiled": tile_image(noisy, blend, restore, batch=16)}
            no_blend = tile_image(noisy, abut, restore, batch=16)
            seams["blended"].append(seam_score(outs["tiled"], plan_tiles(SIZE, SIZE, blend), patch))
            seams["no_blending"].append(seam_score(no_blend, plan_tiles(SIZE, SIZE, abut), patch))
            for k, v in outs.items():
                rows.setdefault(k, []).append((psnr(clean, v, 4), ssim(clean, v, 4)))
        # speed: a 1-megapixel picture, tiled
        big = np.asarray(load_rgb(held_out / "cat.png").resize((1000, 1000), Image.BICUBIC))
        t0 = time.perf_counter()
        tile_image(big, blend, restore, batch=16)
        per_mp = (time.perf_counter() - t0) / 1.0
        memory = {}
        if not args.skip_memory:
            for mp, side in ((1, 1000), (16, 4000)):
                d = tmp / f"mp{mp}"
                d.mkdir()
                Image.fromarray(big).resize((side, side), Image.BICUBIC).save(d / "x.png")
                p = subprocess.run([sys.executable, "-c", _CHILD, spec.kwargs["path"], str(d / "x.png"),
                                    str(tmp / f"out{mp}.png")],
                                   capture_output=True, text=True, cwd=ROOT, check=True,
                                   env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                        "HF_HUB_OFFLINE": "1"})
                memory[f"{mp}MP"] = round(int(p.stdout.split()[-1]) / 1024, 1)
            memory["ratio_16_to_1"] = round(memory["16MP"] / memory["1MP"], 3)
    result = {
        "family": f"mae {spec.kwargs['path']}", "image_size": size, "patch": patch, "pictures": f"{SIZE}x{SIZE}",
        "degradation": "noise:sigma=25", "tile": size, "overlap": OVERLAP,
        "psnr": {k: round(float(np.mean([r[0] for r in v])), 3) for k, v in rows.items()},
        "ssim": {k: round(float(np.mean([r[1] for r in v])), 4) for k, v in rows.items()},
        "seam_score": {k: round(float(np.mean(v)), 3) for k, v in seams.items()},
        "seconds_per_megapixel": round(per_mp, 2),
        "peak_rss_mib": memory,
        "note": "tiny-64 MAE random-initialised unless --mae: the figures show the pipeline, not a trained family",
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
