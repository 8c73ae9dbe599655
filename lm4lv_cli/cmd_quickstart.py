"""`lm4lv quickstart`: the whole pipeline on scikit-image's sample images and a tiny offline model."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lm4lv_core.defaults import CROP_BORDER

from . import options as opt

console = Console()


@opt.with_quickstart_options
def quickstart(options: dict = None) -> None:
    """Run make-data → ft-mae → train → generate → eval on scikit-image samples; write report.md."""
    from lm4lv_core.config import save_yaml
    from lm4lv_core.errors import ConfigError
    from lm4lv_core.jobs import quickstart as qs
    from lm4lv_core.util.fsutil import remove_entries

    o = opt.with_defaults(options, qs.QuickstartConfig)
    verbose = bool(o.pop("verbose"))
    cfg = qs.QuickstartConfig(**dict(o, out=str(Path(o["out"]))))
    out, size, seed, lpips_weight = Path(cfg.out), cfg.size, cfg.seed, cfg.lpips_weight
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"--out {out}: not empty; pass --overwrite to replace an earlier quickstart")
        if not (out / qs.MARKER).is_file():
            raise ConfigError(f"--out {out}: not a quickstart folder (no {qs.MARKER}); --overwrite only "
                              "replaces an earlier quickstart")
        remove_entries(out, qs.OWN_ENTRIES)
    save_yaml(cfg, out / qs.MARKER)
    lam = lpips_weight if lpips_weight is not None else (1.0 if qs.lpips_available() else 0.0)
    start = time.perf_counter()
    console.rule("[bold]lm4lv quickstart")
    console.print(f"sample images from scikit-image → {out / 'images'}")
    train_dir, _ = qs.export_sample_images(out / "images")
    if cfg.crops:
        qs.augment_train_images(train_dir, out / "images/train-crops", size, cfg.crops, seed)
    if lam == 0 and lpips_weight is None:
        console.print("LPIPS backbone weights are not installed: the MAE decoder is fine-tuned with L1 only")
    ran = []
    for stage in qs.stages(cfg, lam, verbose):
        console.rule(f"[bold]{stage.name}")
        console.print(f"$ {qs.command_line(stage)}", markup=False, highlight=False)
        t0 = time.perf_counter()
        _run_and_show(qs, stage)
        stage.seconds = time.perf_counter() - t0
        ran.append(stage)
    table_rows = qs.scores_table(cfg)
    qs.write_grid(cfg)
    total = time.perf_counter() - start
    report = qs.write_report(cfg, table_rows, ran, lam, total)
    page = qs.write_html_report(cfg)
    table = Table(title="held-out images: degraded input vs restored, and the ceiling (the decoder's own reconstruction)")
    for col in ("degradation", "images", "degraded PSNR", "restored PSNR", "Δ PSNR", "ceiling PSNR", "degraded SSIM",
                "restored SSIM", "ceiling SSIM"):
        table.add_column(col, justify="right")
    for r in table_rows:
        table.add_row(r["degradation"], str(r["count"]), f"{r['degraded_psnr']:.2f}", f"{r['restored_psnr']:.2f}",
                      f"{r['restored_psnr'] - r['degraded_psnr']:+.2f}", f"{r['ceiling_psnr']:.2f}",
                      f"{r['degraded_ssim']:.4f}", f"{r['restored_ssim']:.4f}", f"{r['ceiling_ssim']:.4f}")
    console.print(table)
    console.print(f"report: {report} (grid.png, loss.png) — {total:.0f} s in all")
    console.print(f"page: {page} (open it in a browser)", markup=False, highlight=False)


def _run_and_show(qs, stage) -> None:
    """Run a stage through lm4lv_core and print what its command prints."""
    from lm4lv_core.util.progress import progress_bar

    from . import cmd_data, cmd_generate, cmd_mae, cmd_train

    if stage.command in ("make-data", "eval"):
        with progress_bar(stage.command) as bar:
            result = qs.run_stage(stage, progress=bar.update)
    else:
        result = qs.run_stage(stage, on_note=cmd_generate.show_note)
    if stage.command == "make-data":
        cmd_data.show_make_data(result)
    elif stage.command == "eval":
        cmd_data.show_eval(result, crop_border=CROP_BORDER)
    elif stage.command == "ft-mae":
        cmd_mae.show_finetuned(*result)
    elif stage.command == "train":
        cmd_train.show_trained(*result)
    else:
        cmd_generate.show_generated(result)
