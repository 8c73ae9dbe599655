"""``lm4lv recon`` / ``recon-mae``: reconstruct a folder through a vision family's encoder and
decoder (every worker its share) and score the reconstructions against their inputs: the
ceiling a family gives before any LLM is trained."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import CROP_BORDER, JOB_DIR, RECON_BATCH_SIZE
from ..engine import launch
from ..engine.launch import Workers, register_job
from ..errors import ConfigError, LM4LVError
from ..precision import FP32
from ..image.io import load_rgb, require_images, save_png
from ..config import ModuleSpec
from ..sources.presets import mae_path
from ..util.fsutil import user_entries
from ..util.progress import rank0_progress

LOG_FILE = "recon.log"
RESULTS = "recon.json"


@dataclass
class ReconJob:
    """What every ``recon-mae`` worker receives."""

    encoder: ModuleSpec
    decoder: ModuleSpec
    images: str
    out: str
    batch_size: int = RECON_BATCH_SIZE
    crop_border: int = CROP_BORDER
    precision: str = FP32
    tile: int | str | None = None       # reconstruct at native resolution in tiles (auto: the family's size)
    tile_overlap: int | None = None


def reconstruct_folder(encoder: ModuleSpec, decoder: ModuleSpec, images_dir: str | Path, out_dir: str | Path, *,
                       batch_size: int = RECON_BATCH_SIZE, rank: int = 0, world_size: int = 1,
                       crop_border: int = CROP_BORDER, progress=None, precision: str = FP32,
                       device=None, tile=None, tile_overlap: int | None = None) -> list[dict[str, Any]]:
    """Reconstruct every image under ``images_dir`` (this rank's share) into ``out_dir`` under the
    same relative names (``.png``); return per-image PSNR/SSIM rows against the input resized to
    the decoder's output size. ``tile`` (N px or ``auto``): reconstruct each image at its own
    resolution in overlapping tiles (:mod:`lm4lv_core.image.tiles`), scored against the input
    itself; ``batch_size`` then counts tiles."""
    import torch

    from ..data.dataset import image_to_tensor, tensor_to_uint8
    from ..precision import compute_dtype
    from ..image.metrics import psnr, ssim
    from ..vision import build_decoder, build_encoder

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    files = require_images(images_dir)
    device = device or torch.device("cpu")
    dtype = compute_dtype(precision)
    enc = build_encoder(encoder, dtype).to(device).eval()
    dec = build_decoder(decoder, dtype).to(device).eval()
    mine = files[rank::world_size]
    rows: list[dict[str, Any]] = []
    tiling = _tiling(enc, tile, tile_overlap)
    if tiling is not None:
        return _reconstruct_tiled(enc, dec, images_dir, out_dir, mine, tiling, batch_size, crop_border, progress,
                                  device)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        images = [load_rgb(f) for f in chunk]
        x = torch.stack([image_to_tensor(im, enc.image_size) for im in images])
        with torch.inference_mode():
            y = dec(enc(x.to(device))).float().cpu()
        for f, im, yi in zip(chunk, images, y):
            rel = f.relative_to(images_dir).with_suffix(".png")
            src, rec = tensor_to_uint8(image_to_tensor(im, yi.shape[-1])), tensor_to_uint8(yi)
            save_png(rec, out_dir / rel)
            rows.append({"name": rel.as_posix(), "psnr": psnr(src, rec, crop_border),
                         "ssim": ssim(src, rec, crop_border)})
        if progress:
            progress(len(chunk))
    return rows


def _tiling(enc, tile, overlap):
    from ..image.tiles import family_patch, resolve_tiling

    return resolve_tiling(tile, overlap, enc.image_size, family_patch(enc.num_tokens, enc.image_size))


def _reconstruct_tiled(enc, dec, images_dir: Path, out_dir: Path, files: list[Path], tiling, batch_size: int,
                       crop_border: int, progress, device) -> list[dict[str, Any]]:
    """``recon --tile``: the tiles of several images share each batch; each image is written and
    scored against itself (native resolution) when its last tile is in."""
    import torch

    from ..image.metrics import psnr, ssim
    from ..image.tiles import restore_tiled

    rows: list[dict[str, Any]] = []

    def restore(tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255.0)
        if tiling.size != enc.image_size:
            x = torch.nn.functional.interpolate(x, size=(enc.image_size,) * 2, mode="bicubic", antialias=True,
                                                align_corners=False).clamp(0, 1)
        with torch.inference_mode():
            y = dec(enc(x.to(device))).float().cpu().clamp(0, 1)
        if y.shape[-1] != tiling.size:
            y = torch.nn.functional.interpolate(y, size=(tiling.size,) * 2, mode="bicubic", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return y.permute(0, 2, 3, 1).numpy()

    def write(f: Path, rec: np.ndarray) -> None:
        rel = f.relative_to(images_dir).with_suffix(".png")
        save_png(rec, out_dir / rel)
        src = np.asarray(load_rgb(f))
        rows.append({"name": rel.as_posix(), "psnr": psnr(src, rec, crop_border), "ssim": ssim(src, rec, crop_border)})

    restore_tiled(((f, lambda f=f: np.asarray(load_rgb(f))) for f in files), tiling, restore, batch=batch_size,
                  on_image=write, on_batch=(lambda tiles, images: progress(images)) if progress else None)
    return rows


def mean_rows(rows: list[dict[str, Any]], keys=("psnr", "ssim")) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}


@register_job("recon-mae", ReconJob)
def recon_mae_job(job: ReconJob) -> list[dict[str, Any]] | None:
    """Worker side: each rank reconstructs its share; rank 0 gathers the rows into ``recon.json``."""
    from ..util import dist
    from ..util.fsutil import write_json_atomic

    dist.init_distributed()
    n_mine = len(require_images(job.images)[dist.rank()::dist.world_size()])
    with rank0_progress("reconstruct", n_mine, show=dist.is_main()) as advance:
        rows = reconstruct_folder(job.encoder, job.decoder, job.images, job.out, batch_size=job.batch_size,
                                  rank=dist.rank(), world_size=dist.world_size(), crop_border=job.crop_border,
                                  progress=advance, precision=job.precision, device=dist.device(),
                                  tile=job.tile, tile_overlap=job.tile_overlap)
    gathered = dist.all_gather_objects(rows)
    if not dist.is_main():
        return None
    merged = sorted((r for part in gathered for r in part), key=lambda r: r["name"])
    write_json_atomic(Path(job.out) / RESULTS, {"count": len(merged), "mean": mean_rows(merged), "images": merged})
    return merged


def _check_overwrite(out: Path, names: list[str]) -> None:
    """``--overwrite`` replaces only what an earlier ``recon-mae`` wrote (listed in its ``recon.json``)."""
    import json

    ours: set[str] = set()
    record = out / RESULTS
    if record.is_file():
        try:
            ours = {r["name"] for r in json.loads(record.read_text(encoding="utf-8"))["images"]}
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"--out {out}: {RESULTS} was not written by lm4lv recon; --overwrite replaces "
                              "only lm4lv's outputs: choose another --out") from None
    theirs = [n for n in names if (out / n).exists() and n not in ours]
    if theirs:
        raise ConfigError(f"--out {out}: {', '.join(theirs[:3])} {'were' if len(theirs) > 1 else 'was'} not written by "
                          "lm4lv recon; --overwrite replaces only lm4lv's outputs: choose another --out")


def recon_parts(mae: str | None = None, preset: str | None = None, encoder: str | None = None,
                decoder: str | None = None) -> tuple[ModuleSpec, ModuleSpec]:
    """The encoder and decoder to reconstruct with: ``--encoder/--decoder FAMILY:SOURCE`` (the
    decoder defaults to the encoder's family), ``--mae`` (both MAE) or a preset's vision parts;
    hub ids resolved to local folders."""
    from ..sources.hub import local_path
    from ..sources.presets import preset_config
    from ..vision import has_decoder, parse_part

    if sum(bool(x) for x in (mae, preset, encoder)) != 1:
        raise ConfigError("give exactly one of --encoder FAMILY:SOURCE, --mae PATH|ID or --preset NAME")
    if mae:
        path, _ = mae_path(mae, None)
        return ModuleSpec("mae", {"path": path}), ModuleSpec("mae", {"path": path})
    if preset:
        cfg = preset_config(preset)
        return cfg.encoder, cfg.decoder
    enc = parse_part(encoder, "encoder")
    if decoder:
        dec = parse_part(decoder, "decoder")
    elif has_decoder(enc.name):
        dec = ModuleSpec(enc.name, dict(enc.kwargs))
    else:
        dec = None
    if dec is None:
        raise ConfigError(f"--encoder {enc.name} has no decoder to reconstruct with; give --decoder FAMILY:SOURCE")
    for spec, option in ((enc, "--encoder"), (dec, "--decoder")):
        if isinstance(spec.kwargs.get("path"), str):
            spec.kwargs["path"] = local_path(spec.kwargs["path"], option)[0]
    return enc, dec


def reconstruct(images: str | Path, out: str | Path, *, mae: str | None = None, preset: str | None = None,
                encoder: str | None = None, decoder: str | None = None,
                batch_size: int = RECON_BATCH_SIZE, crop_border: int = CROP_BORDER, precision: str = FP32,
                workers: Workers | None = None, overwrite: bool = False,
                verbose: bool = False, tile=None, tile_overlap: int | None = None) -> list[dict[str, Any]]:
    """Parent side of ``lm4lv recon`` / ``recon-mae``: check, then run the reconstruction workers
    (third-party output goes to ``out/recon.log``). On several nodes (one launcher each) ``out`` is on the
    shared filesystem and holds the job folder; node 0 checks that it may write there."""
    from ..precision import compute_dtype
    from ..util.runlock import hold

    compute_dtype(precision)
    launch.require_gpu_for(precision)
    enc, dec = recon_parts(mae, preset, encoder, decoder)
    if tile is not None or tile_overlap is not None:  # checked before anything is written
        from ..image.tiles import family_patch, resolve_tiling
        from ..vision import token_space

        space = token_space(enc)
        resolve_tiling(tile, tile_overlap, space.image_size, family_patch(space.num_tokens, space.image_size))
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise LM4LVError(f"{images}: folder not found")
    files = require_images(images)
    if out.resolve() == images.resolve() or images.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out}: must not be the input folder or inside it")
    workers = (workers or Workers()).resolve()
    job = ReconJob(encoder=enc, decoder=dec, images=str(images.resolve()), out=str(out.resolve()),
                   batch_size=batch_size, crop_border=crop_border, precision=precision, tile=tile,
                   tile_overlap=tile_overlap)
    names = [f.relative_to(images).with_suffix(".png").as_posix() for f in files]
    if not workers.per_node:
        _check_out(out, overwrite, names)
        with tempfile.TemporaryDirectory(prefix="lm4lv-recon-") as job_dir:
            return launch.run_job("recon-mae", job, job_dir=job_dir, workers=workers, log_file=out / LOG_FILE,
                                  verbose=verbose)
    with hold(out, "recon-mae", node=workers.node, shared=(JOB_DIR,)), \
            launch.on_node(workers, out / JOB_DIR, out / LOG_FILE):
        if workers.node == 0:
            _check_out(out, overwrite, names)
        return launch.run_job("recon-mae", job, job_dir=out / JOB_DIR, workers=workers, log_file=out / LOG_FILE,
                              verbose=verbose)


def _check_out(out: Path, overwrite: bool, names: list[str]) -> None:
    """A non-empty ``out`` needs ``--overwrite``, which replaces only an earlier run's reconstructions."""
    if out.is_dir() and any(p.name != JOB_DIR for p in user_entries(out)):
        if not overwrite:
            raise ConfigError(f"--out {out}: the folder is not empty; pass --overwrite to write into it")
        _check_overwrite(out, names)
