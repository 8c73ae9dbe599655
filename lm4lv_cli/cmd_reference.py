"""`lm4lv import-reference`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from . import options as opt

console = Console()

O = typer.Option


@opt.with_import_options
@opt.with_import_own_options
def import_reference(
    checkpoint: Path = typer.Argument(..., metavar="PT", help="The reference's delta checkpoint (pytorch_model.pt or pytorch_model_epN.pt)."),
    model: dict = None,
    options: dict = None,
) -> None:
    """Turn a reference delta checkpoint into an lm4lv saved model folder."""
    from lm4lv_core.jobs.import_reference import import_reference as run_import

    from lm4lv_core.jobs.configs import ImportOptions

    o = opt.with_defaults(options, ImportOptions)
    out, config_from, overwrite = o["out"], o["config_from"], o["overwrite"]
    line = run_import(str(checkpoint), str(out), model, str(config_from) if config_from else None, overwrite)
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"[green]done[/green]: {out} (lm4lv generate --run {out} ...)", soft_wrap=True)
