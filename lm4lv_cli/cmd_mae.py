"""`lm4lv ft-mae` and `lm4lv recon-mae`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lm4lv_core.defaults import CROP_BORDER, RECON_BATCH_SIZE

from . import options as opt

console = Console()
O = typer.Option


@opt.with_ft_mae_options
def ft_mae(
    images: Path = typer.Argument(..., help="Folder of training images (recursive)."),
    config: Optional[Path] = opt.CONFIG,
    options: dict = None,
) -> None:
    """Fine-tune the MAE decoder with |x − D(E(x))|₁ + λ·LPIPS (encoder frozen by default)."""
    from lm4lv_core.jobs.ft_mae import finetune, resolve_finetune_options

    train_cfg, mae_cfg = resolve_finetune_options(dict(options, data=str(images)), str(config) if config else None)
    show_finetuned(train_cfg, finetune(train_cfg, mae_cfg))


def show_finetuned(train_cfg, summary) -> None:
    console.print(f"[green]done[/green]: {train_cfg.out}/final" if summary and summary.get("finished")
                  else f"[green]stopped[/green]: {train_cfg.out} (resume with --resume)")


@opt.with_worker_options
@opt.with_tile_options
def recon_mae(
    images: Path = typer.Argument(..., help="Folder of images to reconstruct (recursive)."),
    out: Path = O(..., "--out", help="Output folder (same relative names, .png)."),
    mae: Optional[str] = O(None, "--mae", help="MAE folder (e.g. RUN/final of ft-mae) or Hugging Face id org/name[@revision]."),
    preset: Optional[str] = O(None, "--preset", help="Tiny offline preset whose vision parts to use."),
    encoder: Optional[str] = O(None, "--encoder", help="Vision encoder FAMILY:SOURCE (any family with a decoder), e.g. vqgan-codes:./vq-f16."),
    decoder: Optional[str] = O(None, "--decoder", help="Vision decoder FAMILY:SOURCE [the encoder's family]."),
    batch_size: int = O(RECON_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass."),
    workers: dict = None,
    tiles: dict = None,
    crop_border: int = O(CROP_BORDER, "--crop-border", min=0, help="Pixels cropped from each side before PSNR/SSIM."),
    overwrite: bool = O(False, "--overwrite", help="Write into a non-empty --out (replacing only an earlier recon-mae's reconstructions)."),
    verbose: bool = opt.VERBOSE,
) -> None:
    """Reconstruct a folder through a vision encoder and decoder (an MAE by default) and print
    PSNR / SSIM against the inputs: the ceiling a vision family gives."""
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.recon_mae import mean_rows, reconstruct

    precision = opt.with_defaults(workers, TrainConfig)["precision"]

    rows = reconstruct(images, out, mae=mae, preset=preset, encoder=encoder, decoder=decoder, batch_size=batch_size,
                       crop_border=crop_border,
                       precision=precision, overwrite=overwrite,
                       workers=opt.workers_of(workers), verbose=verbose, **tiles)
    table = Table(title=f"{'MAE' if mae else encoder or preset} reconstruction of {images}")
    for col in ("images", "PSNR (dB)", "SSIM"):
        table.add_column(col, justify="right")
    m = mean_rows(rows)
    table.add_row(str(len(rows)), f"{m['psnr']:.3f}", f"{m['ssim']:.4f}")
    console.print(table)
    console.print(f"reconstructions in {out}, per image scores in {out / 'recon.json'}")
