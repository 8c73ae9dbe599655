"""`lm4lv make-data` and `lm4lv eval`: parse options, call lm4lv_core, render with rich."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lm4lv_core.util.progress import progress_bar

from . import options as opt

_MAX_LISTED = 10


def _list_degradations() -> None:
    from lm4lv_core.image.degrade import describe

    table = Table(title="degradations (NAME:k=v,... ; chain with +)")
    table.add_column("name", style="bold")
    table.add_column("effect")
    table.add_column("parameters = default (range): meaning")
    for row in describe():
        name = row["name"] + (f"\n({', '.join(row['aliases'])})" if row["aliases"] else "")
        table.add_row(name, row["help"], "\n".join(row["params"]) or "-")
    Console().print(table)
    typer.echo("Numeric values may be ranges lo..hi and any value a choice a|b|c, drawn per "
               "image, e.g. noise:sigma=10..50, rotate:angle=90|270.")


def _unmatched(console: Console, label: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:_MAX_LISTED]) + (" ..." if len(names) > _MAX_LISTED else "")
        console.print(f"[yellow]{len(names)} {label}:[/] {shown}")


@opt.with_make_data_options
def make_data(
    clean_dir: Optional[Path] = typer.Argument(None, help="Folder of clean images (recursive)."),
    list_: bool = typer.Option(False, "--list", help="List the degradations and exit."),
    options: dict = None,
) -> None:
    """Build a restoration dataset: hq/, lq/<degradation>/, train.json, test.json, manifest.json.

    With --lq/--hq: pair existing images by relative path or name, write only the JSON files.
    """
    if list_:
        _list_degradations()
        return
    from lm4lv_core.errors import ConfigError
    from lm4lv_core.jobs.make_data import MakeDataConfig, make_data as build

    o = opt.with_defaults(options, MakeDataConfig)
    if o["out"] is None:
        raise ConfigError("--out DATA_DIR is required")
    cfg = MakeDataConfig(out=o["out"], clean_dir=clean_dir, degradations=o["degradation"], size=o["size"],
                         seed=o["seed"], test_fraction=o["test_fraction"], test_dir=o["test_dir"],
                         prompt=o["prompt"], workers=o["workers"], overwrite=o["overwrite"], lq_dir=o["lq"],
                         hq_dir=o["hq"], resize=o["resize"], on_error=o["on_error"])
    with progress_bar("make-data", rate=True) as bar:
        res = build(cfg, progress=bar.update)
    show_make_data(res)
    report_failures(len(res.failures), res.out / "failures.csv", "made")


def show_make_data(res) -> None:
    """What ``lm4lv make-data`` prints about the dataset it made."""
    console = Console()
    if res.mode == "pair":
        console.print(f"paired {res.n_images} images -> {res.n_train} train, {res.n_test} test "
                      "samples")
        _unmatched(console, "unpaired LQ files", res.unmatched_lq)
        _unmatched(console, "unpaired HQ files", res.unmatched_hq)
    else:
        console.print(f"{res.n_images} images x {len(res.degradations)} degradation(s) -> "
                      f"{res.n_train} train, {res.n_test} test samples "
                      f"({', '.join(res.degradations)})")
    if res.resumed:
        console.print(f"continued an interrupted run: {res.resumed} image(s) were already made")
    console.print(f"wrote {res.out}")


@opt.with_eval_options
def evaluate(
    metric: str = typer.Argument(..., help="psnr | ssim | lpips (or a comma list, or all)."),
    gt: Path = typer.Argument(..., help="Ground-truth image or folder."),
    pred: List[Path] = typer.Argument(..., help="Restored image(s) or folder(s) (paired by path / name); "
                                      "several are compared in one table."),
    options: dict = None,
) -> None:
    """Score restored images against ground truth with PSNR / SSIM / LPIPS (several PRED: one table
    with each folder's mean and its difference to the first)."""
    from lm4lv_core.jobs.configs import EvalConfig
    from lm4lv_core.jobs.evaluate import evaluate as score

    o = opt.with_defaults(options, EvalConfig)
    labels = o.pop("labels")
    names = [s.strip() for s in labels.split(",")] if labels else None
    failures = failures_path([o["csv_file"], o["json_file"], o["grid"]])
    with progress_bar("eval", rate=True) as bar:
        cmp = score(metric, gt, pred, labels=names, progress=bar.update, failures_file=failures, **o)
    show_eval(cmp, crop_border=o["crop_border"], y_channel=o["y_channel"], grid=o["grid"])
    if o["html"]:
        typer.echo(f"page: {o['html']}")
    report_failures(len(cmp.failures), failures, "scored")


def failures_path(outputs) -> Path:
    """``failures.csv`` beside the first output file (else in the current folder)."""
    for o in outputs:
        if o:
            return Path(o).resolve().parent / "failures.csv"
    return Path("failures.csv").resolve()


EXIT_FAILURES = 3  # some images failed under --on-error skip; the rest were done


def report_failures(n: int, path: Path, done: str) -> None:
    """Under ``--on-error skip``: one line with the count of failed images, exit code 3."""
    if n:
        typer.secho(f"{n} image(s) could not be {done}; see {path}", fg="yellow", err=True)
        raise typer.Exit(EXIT_FAILURES)


def show_eval(cmp, *, crop_border: int, y_channel: bool = False, grid: Optional[Path] = None) -> None:
    """What ``lm4lv eval`` prints: one table (several predictions: side by side) and unmatched names."""
    gt, pred = cmp.gt, cmp.paths
    single = len(pred) == 1
    console = Console()
    opts = f"crop_border={crop_border}" + (", Y channel" if y_channel else ", RGB")
    if single:
        _single_table(console, cmp.reports[0], f"{gt} vs {pred[0]} ({opts})")
    else:
        _compare_table(console, cmp, f"{gt}: {len(pred)} predictions ({opts})")
    for label, rep in zip(cmp.labels, cmp.reports):
        suffix = "" if single else f" ({label})"
        _unmatched(console, f"ground-truth images without a prediction{suffix}", rep.unmatched_gt)
        _unmatched(console, f"predictions without a ground-truth image{suffix}", rep.unmatched_pred)
    if grid:
        console.print(f"grid: {grid}")


def _metric_label(name: str) -> str:
    """``PSNR ↑``: the arrow says which way is better."""
    from lm4lv_core.image.metrics import METRICS

    return f"{name.upper()} {'↑' if METRICS.get(name).higher_is_better else '↓'}"


def _single_table(console: Console, report, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("mean", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("count", justify="right")
    for m in report.metrics:
        vals = report.values(m)
        table.add_row(_metric_label(m), f"{report.mean(m):.4f}", f"{vals.min():.4f}",
                      f"{vals.max():.4f}", str(report.count))
    console.print(table)


def _compare_table(console: Console, cmp, title: str) -> None:
    """A column group per folder: its mean and (after the first) its difference to the first."""
    table = Table(title=title)
    table.add_column("metric", style="bold")
    for k, label in enumerate(cmp.labels):
        table.add_column(f"{label}\nmean", justify="right")
        if k:
            table.add_column(f"{label}\nΔ vs {cmp.labels[0]}", justify="right")
    means = [cmp.mean(k) for k in range(len(cmp.labels))]
    diffs = [cmp.difference(k) if k else None for k in range(len(cmp.labels))]
    for m in cmp.metrics:
        cells = [_metric_label(m)]
        for k in range(len(cmp.labels)):
            cells.append(f"{means[k][m]:.4f}")
            if k:
                cells.append(f"{diffs[k][m]:+.4f}")
        table.add_row(*cells)
    cells = ["images"]
    for k, rep in enumerate(cmp.reports):
        cells += [str(rep.count)] + ([""] if k else [])
    table.add_row(*cells)
    console.print(table)
