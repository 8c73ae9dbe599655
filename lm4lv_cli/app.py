"""The `lm4lv` console command: a table of subcommands, each a thin wrapper over lm4lv_core."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from lm4lv_core import __version__
from lm4lv_core.errors import LM4LVError

from . import cmd_data, cmd_demo, cmd_generate, cmd_mae, cmd_quickstart, cmd_reference, cmd_train

app = typer.Typer(
    name="lm4lv",
    help="LM4LV: restore images (and caption, generate) with a frozen LLM, a vision encoder / decoder and two adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # for the help panels; help texts are escaped (_as_written), shown as written
)

COMMANDS = {
    "train": cmd_train.train,
    "generate": cmd_generate.generate,
    "eval": cmd_data.evaluate,
    "make-data": cmd_data.make_data,
    "ft-mae": cmd_mae.ft_mae,
    "recon-mae": cmd_mae.recon_mae,
    "recon": cmd_mae.recon_mae,
    "quickstart": cmd_quickstart.quickstart,
    "import-reference": cmd_reference.import_reference,
    "demo": cmd_demo.demo,
}
def _as_written(fn) -> str:
    """The command's help and its options' help shown as written: brackets such as "[default: 4]"
    are not rich markup (escaped once, also for options shared by several commands)."""
    import inspect

    from rich.markup import escape

    for p in inspect.signature(fn).parameters.values():
        info = p.default
        if isinstance(info, typer.models.ParameterInfo) and info.help and not getattr(info, "_escaped", False):
            info.help = escape(info.help)
            info._escaped = True
    return escape(inspect.getdoc(fn) or "")


for _name, _fn in COMMANDS.items():
    app.command(_name, help=_as_written(_fn))(_fn)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lm4lv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    plugin: Optional[list[str]] = typer.Option(None, "--plugin", help="A module name or .py file that registers "
                                               "your own vision parts, degradations or metrics; repeatable, and "
                                               "accepted after any command too (also: LM4LV_PLUGINS, entry points "
                                               "lm4lv.plugins)."),
) -> None:
    """LM4LV: restore images (and caption, generate) with a frozen LLM, a vision encoder / decoder and two adapters."""


def main() -> None:
    """Console entry point. Usage errors are reported the CLI framework's own way (usage line, one
    error line, exit code 2), whichever click typer vendors; lm4lv's own errors are one ``error:`` line."""
    from lm4lv_core.errors import Interrupted
    from lm4lv_core.util.signals import EXIT_ABORTED, EXIT_INTERRUPTED

    try:
        from lm4lv_core import plugins

        sys.argv[1:], specs = take_plugins(sys.argv[1:])
        plugins.load_all(specs)
        code = app(standalone_mode=False)  # typer returns 130 for a KeyboardInterrupt (a second signal)
        if code == EXIT_ABORTED:
            typer.echo("aborted", err=True)
        if isinstance(code, int) and code:
            sys.exit(code)
    except LM4LVError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except Interrupted as e:  # stopped on SIGTERM / Ctrl-C with its progress saved
        typer.secho(str(e), fg="yellow", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # a second signal outside a command
        typer.echo("aborted", err=True)
        sys.exit(EXIT_ABORTED)
    except OSError as e:  # a write that failed outside lm4lv's own checks: still one line
        from lm4lv_core.util.fsutil import write_failure

        cause = write_failure(e)
        if cause is None:
            raise
        typer.secho(f"error: cannot write {e.filename or 'an output'}: {cause}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:
        # usage errors of the click that typer uses (typer may vendor its own copy, so the class
        # is recognised by what it offers, not by importing a click module)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise


def take_plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--plugin X`` / ``--plugin=X`` anywhere on the command line (before or after the command)
    → the other arguments and the plugins, so they load before any option names their parts."""
    rest, specs, it = [], [], iter(argv)
    for arg in it:
        if arg == "--":
            rest += [arg, *it]
            break
        if arg == "--plugin":
            value = next(it, None)
            if value is None:
                raise LM4LVError("--plugin needs a module name or a .py file")
            specs.append(value)
        elif arg.startswith("--plugin="):
            specs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, specs


if __name__ == "__main__":
    main()
