"""`lm4lv ft-mae` and `lm4lv recon-mae`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


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
@opt.with_recon_model_options
@opt.with_recon_options
def recon_mae(
    images: Path = typer.Argument(..., help="Folder of images to reconstruct (recursive)."),
    model: dict = None,
    workers: dict = None,
    tiles: dict = None,
    options: dict = None,
) -> None:
    """Reconstruct a folder through a vision encoder and decoder (an MAE by default) and print
    PSNR / SSIM against the inputs: the ceiling a vision family gives."""
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.recon_mae import mean_rows, reconstruct

    from lm4lv_core.jobs.configs import ReconOptions

    w = opt.with_defaults(workers, TrainConfig)
    o = opt.with_defaults(options, ReconOptions)
    mae, preset, encoder, out = model["mae"], model["preset"], model["encoder"], o["out"]
    rows = reconstruct(images, o["out"], **model, batch_size=o["batch_size"], crop_border=o["crop_border"],
                       precision=w["precision"], overwrite=o["overwrite"], workers=opt.workers_of(workers),
                       verbose=bool(w["verbose"]), **tiles)
    table = Table(title=f"{'MAE' if mae else encoder or preset} reconstruction of {images}")
    for col in ("images", "PSNR (dB)", "SSIM"):
        table.add_column(col, justify="right")
    m = mean_rows(rows)
    table.add_row(str(len(rows)), f"{m['psnr']:.3f}", f"{m['ssim']:.4f}")
    console.print(table)
    console.print(f"reconstructions in {out}, per image scores in {out / 'recon.json'}")
