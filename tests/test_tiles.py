"""Tiled restoration (``--tile N|auto --tile-overlap M``): the tiling itself (plan, reflect padding,
window, banded canvas), exactness through ``recon`` with an exact pixel-patch family (a plugin
written here), the bookkeeping of tiles of several images in one batch through ``restore()`` and
``generate --input --nproc 2`` with a stand-in model whose generated image is its input, a real
tiny model with ``<query>``, and the one-line refusals of the installed ``lm4lv``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LM4LV = Path(sys.executable).parent / "lm4lv"

# an exact encoder / decoder pair: one token per 8x8 patch, its 192 values (README's example, any size)
PATCH_FAMILY = '''
from lm4lv_core.registry import DECODERS, ENCODERS
from lm4lv_core.vision import VisionDecoder, VisionEncoder


class PatchEncoder(VisionEncoder):
    def __init__(self, image_size: int = 64, patch: int = 8):
        super().__init__()
        self.image_size, self.patch = image_size, patch
        self.dim, self.num_tokens = 3 * patch * patch, (image_size // patch) ** 2

    @classmethod
    def source_kwargs(cls, source):
        return {"image_size": int(source)} if source else {}

    def forward(self, pixels):
        p = self.patch
        x = pixels.unfold(2, p, p).unfold(3, p, p)
        return x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2) * 2 - 1


class PatchDecoder(VisionDecoder, PatchEncoder):
    def forward(self, tokens, clamp=True):
        b, p, n = tokens.shape[0], self.patch, self.image_size // self.patch
        x = ((tokens + 1) / 2).view(b, n, n, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, n * p, n * p)
        return x.clamp(0, 1) if clamp else x


ENCODERS.register("patch")(PatchEncoder)
DECODERS.register("patch")(PatchDecoder)
'''

# a stand-in model for the tile bookkeeping: every generated image is the row's own input image
ECHO = '''
import lm4lv_core.model.generate as g
from lm4lv_core.model.generate import SampleOutput

BATCHES = []


def echo_batch(model, batch, cfg, *, image_only, keys=None, decode_images=True, compile=False):
    outs = []
    for b in range(batch.size):
        idx = batch.slot_image[b][batch.slot_image[b] >= 0]
        outs.append(SampleOutput(text="<image>", images=[batch.pixels[int(idx[0])].float()]))
    BATCHES.append(batch.size)
    return outs


g.generate_batch = echo_batch
'''


def lm4lv(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([str(LM4LV), *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=400)


def photo(name: str, w: int, h: int) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BICUBIC))


def maxdiff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)).max())


# ---------------------------------------------------------------------------- the tiling itself
@pytest.mark.parametrize("h,w,size,overlap", [(256, 256, 64, 16), (1000, 701, 64, 16), (1, 1, 8, 3),
                                               (37, 5, 16, 15), (71, 100, 32, 0)])
def test_identity_tiles_reassemble_any_size_exactly(h, w, size, overlap):
    from lm4lv_core.image.tiles import Tiling, plan_tiles, tile_image

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    calls = []
    out = tile_image(img, Tiling(size, overlap), lambda t: calls.append(len(t)) or t / 255.0, batch=7)
    assert out.shape == img.shape and maxdiff(out, img) == 0
    assert sum(calls) == plan_tiles(h, w, Tiling(size, overlap)).count and max(calls) <= 7


def test_window_ramps_sum_to_one_and_canvas_keeps_only_a_band():
    from lm4lv_core.image.tiles import Canvas, Tiling, cut_tile, plan_tiles, window

    w = window(64, 16)[32]  # a middle row: the 1-D window
    assert w.min() > 0 and np.allclose(w[48:] + w[:16], w[32])
    plan = plan_tiles(2000, 300, Tiling(64, 16))
    canvas, img = Canvas(plan), np.zeros((2000, 300, 3), np.uint8)
    for k in range(plan.count):
        canvas.add(k, cut_tile(img, plan, k) / 255.0)
        assert canvas.band.shape[0] <= 64
    assert canvas.finish().shape == (2000, 300, 3)


def test_options_are_checked():
    from lm4lv_core.errors import ConfigError
    from lm4lv_core.image.tiles import Tiling, family_patch, resolve_tiling

    assert family_patch(1 + 64, 64) == 8 and family_patch(256, 256) == 16 and family_patch(7, 32) == 32
    assert resolve_tiling("auto", None, 64, 8) == Tiling(64, 16)
    assert resolve_tiling(None, None, 64, 8) is None
    for tile, overlap, msg in [("4", None, "smaller than the vision family's patch"), (64, 64, "smaller than the tile"),
                               (None, 8, "needs --tile"), ("x", None, "number of pixels or auto")]:
        with pytest.raises(ConfigError, match=msg):
            resolve_tiling(tile, overlap, 64, 8)


def test_seam_score_sees_hard_seams():
    from lm4lv_core.image.tiles import Tiling, plan_tiles, seam_score

    rng = np.random.default_rng(0)
    plan = plan_tiles(128, 128, Tiling(32, 0))
    smooth = np.repeat(np.linspace(0, 255, 128)[None, :, None], 128, 0).repeat(3, -1).astype(np.uint8)
    assert abs(seam_score(smooth, plan, 8) - 1.0) < 0.05
    steps = smooth.astype(int)
    for b in (32, 64, 96):
        steps[:, b:] += 20 * int(rng.integers(1, 3))
    assert seam_score(np.clip(steps, 0, 255).astype(np.uint8), plan, 8) > 5


# ---------------------------------------------------------------------------- recon with an exact family
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiles")
    (root / "patch_family.py").write_text(PATCH_FAMILY)
    (root / "echo_model.py").write_text(ECHO)
    (root / "img").mkdir()
    Image.fromarray(photo("astronaut", 256, 256)).save(root / "img" / "a.png")
    Image.fromarray(photo("chelsea", 1000, 701)).save(root / "img" / "b.png")
    return root


def test_recon_tile_is_exact_where_the_family_is_and_the_resize_path_is_not(work):
    p = lm4lv("--plugin", "patch_family.py", "recon", "img", "--encoder", "patch:64", "--tile", "auto",
              "--tile-overlap", "16", "--out", "tiled", "--batch-size", "32", cwd=work)
    assert p.returncode == 0, p.stderr
    p2 = lm4lv("--plugin", "patch_family.py", "recon", "img", "--encoder", "patch:64", "--out", "resized", cwd=work)
    assert p2.returncode == 0, p2.stderr
    for name in ("a.png", "b.png"):
        src = Image.open(work / "img" / name)
        tiled = Image.open(work / "tiled" / name)
        assert tiled.size == src.size and maxdiff(tiled, src) <= 1
        resized = Image.open(work / "resized" / name).resize(src.size, Image.BICUBIC)
        assert maxdiff(resized, src) > 50


# ---------------------------------------------------------------------------- generate: bookkeeping
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    root = tmp_path_factory.mktemp("tiles-run")
    torch.manual_seed(0)
    model = LM4LV.from_config(preset_config("tiny", restore_prompt="<image> <task>"))
    model.save_pretrained(root / "run" / "final")
    return root / "run"


def test_restore_tiles_of_two_images_in_one_batch_each_land_in_their_own(work, run, monkeypatch):
    """A stand-in model whose generated image is its input: tiled restore() gives the inputs back
    (at 32 px tiles = the model's size), batches mixing both images' tiles; the resize path does not."""
    from lm4lv_core.model import generate as g

    own = g.generate_batch
    sys.path.insert(0, str(work))
    try:
        import echo_model  # (it replaces generate_batch when imported: put back below, then patched for this test)
    finally:
        sys.path.remove(str(work))
        g.generate_batch = own
    from lm4lv_core.model.generate import GenerationConfig, restore
    from lm4lv_core.model.lm4lv import LM4LV

    monkeypatch.setattr(g, "generate_batch", echo_model.echo_batch)
    model = LM4LV.from_pretrained(run / "final")
    a, b = Image.fromarray(photo("astronaut", 75, 53)), Image.fromarray(photo("coffee", 40, 61))
    echo_model.BATCHES.clear()
    out = restore(model, [a, b], batch_size=8, cfg=GenerationConfig(mode="image", tile="auto", tile_overlap=8))
    assert [o.size for o in out] == [a.size, b.size]
    assert maxdiff(out[0], a) <= 1 and maxdiff(out[1], b) <= 1
    assert len(echo_model.BATCHES) > 1 and all(n <= 8 for n in echo_model.BATCHES)
    resized = restore(model, [a, b], batch_size=8, cfg=GenerationConfig(mode="image"))
    assert maxdiff(resized[0], a) > 20


@pytest.mark.slow
def test_generate_input_tiles_on_two_workers(work, run, tmp_path):
    """The same stand-in (loaded in every worker via LM4LV_PLUGINS) through generate --input with
    --nproc 2: every image, of four of different sizes, comes back as itself, closer to its own
    input than to any other."""
    inp = tmp_path / "in"
    inp.mkdir()
    names = {"a.png": ("astronaut", 90, 37), "b.png": ("coffee", 41, 77), "c.png": ("chelsea", 64, 64),
             "d.png": ("camera", 33, 50)}
    for n, (src, w, h) in names.items():
        Image.fromarray(photo(src, w, h)).save(inp / n)
    p = lm4lv("generate", "--run", run, "--input", inp, "--out", tmp_path / "out", "--tile", "auto",
              "--tile-overlap", "8", "--batch-size", "5", "--nproc", "2", cwd=tmp_path,
              env={"LM4LV_PLUGINS": str(work / "echo_model.py")})
    assert p.returncode == 0, p.stderr
    for n in names:
        got, want = Image.open(tmp_path / "out" / n), Image.open(inp / n)
        assert got.size == want.size and maxdiff(got, want) <= 1


def test_real_tiny_model_with_query_restores_tiles(tmp_path):
    """One-pass <query> generation on tiles of a real (random) tiny model: one image per input, at
    its size."""
    from lm4lv_core.model.generate import GenerationConfig, restore
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    cfg = preset_config("tiny")
    cfg.query = True
    torch.manual_seed(0)
    model = LM4LV.from_config(cfg)
    imgs = [Image.fromarray(photo("astronaut", 45, 33)), Image.fromarray(photo("coins", 32, 70))]
    assert model.query_tokens is not None  # image-only answers are read from the query in one pass
    out = restore(model, imgs, "<image> <task>", batch_size=4, cfg=GenerationConfig(mode="image", tile=32,
                                                                                   tile_overlap=8))
    assert [o.size for o in out] == [im.size for im in imgs]


# ---------------------------------------------------------------------------- refusals
def test_bad_tile_options_are_one_line_errors_and_write_nothing(work, run, tmp_path):
    from lm4lv_core.model.lm4lv import LM4LV
    from lm4lv_core.sources.presets import preset_config

    cfg = preset_config("tiny")
    cfg.decoder, cfg.restore_prompt = None, "<image> <task>"
    LM4LV.from_config(cfg).save_pretrained(tmp_path / "blind" / "final")
    inp = work / "img"
    cases = [(["--run", run, "--tile", "3"], "smaller than the vision family's patch"),
             (["--run", run, "--tile", "32", "--tile-overlap", "32"], "must be smaller than the tile"),
             (["--run", tmp_path / "blind", "--tile", "auto"], "cannot paint")]
    for i, (args, msg) in enumerate(cases):
        out = tmp_path / f"out{i}"
        p = lm4lv("generate", *args, "--input", inp, "--out", out, cwd=tmp_path)
        lines = (p.stderr + p.stdout).strip().splitlines()
        assert p.returncode == 2 and lines[-1].startswith("error: ") and msg in lines[-1], p.stderr
        assert sum(line.startswith("error:") for line in lines) == 1 and not out.exists()
    p = lm4lv("--plugin", "patch_family.py", "recon", "img", "--encoder", "patch:64", "--tile", "4",
              "--out", tmp_path / "r", cwd=work)
    assert p.returncode == 2 and "smaller than the vision family's patch" in p.stderr and not (tmp_path / "r").exists()
