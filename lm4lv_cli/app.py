"""The `lm4lv` console command: a table of subcommands, each a thin wrapper over lm4lv_core."""

from __future__ import annotations

import sys

import typer

from lm4lv_core import __version__
from lm4lv_core.errors import LM4LVError

from . import cmd_data, cmd_generate, cmd_mae, cmd_quickstart, cmd_train

app = typer.Typer(
    name="lm4lv",
    help="LM4LV: restore images with a frozen LLM, an MAE and two linear adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is shown as written: rich or markdown markup would eat "[default]" and "<image>"
)

COMMANDS = {
    "train": cmd_train.train,
    "generate": cmd_generate.generate,
    "eval": cmd_data.evaluate,
    "make-data": cmd_data.make_data,
    "ft-mae": cmd_mae.ft_mae,
    "recon-mae": cmd_mae.recon_mae,
    "quickstart": cmd_quickstart.quickstart,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lm4lv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """LM4LV: restore images with a frozen LLM, an MAE and two linear adapters."""


def main() -> None:
    """Console entry point. The CLI framework reports usage errors itself (usage line, one error
    line, exit code 2), whichever typer/click it vendors; lm4lv's own errors are one ``error:`` line."""
    try:
        app()
    except LM4LVError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
