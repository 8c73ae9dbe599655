"""`lm4lv generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lm4lv_core.errors import ConfigError

from . import options as opt

console = Console()


@opt.with_worker_options
@opt.with_generation_options
@opt.with_generate_options
def generate(
    more_inputs: Optional[list[Path]] = typer.Argument(None, hidden=True, metavar="PATH"),
    workers: dict = None,
    gen: dict = None,
    options: dict = None,
) -> None:
    """Generate images (and text) for a data file with a trained model, or restore image files and
    folders (--input); re-runs skip finished samples and images."""
    from lm4lv_core.jobs.configs import GenerateOptions

    o = opt.with_defaults(options, GenerateOptions)
    run, data, inputs, prompt, out, image_root = (o[k] for k in ("run", "data", "inputs", "prompt", "out", "image_root"))
    batch_size, overwrite, compile, on_error, html = (o[k] for k in ("batch_size", "overwrite", "compile", "on_error",
                                                                     "html"))
    verbose = bool(workers.pop("verbose", None))
    paths = [*(inputs or []), *(more_inputs or [])]
    if more_inputs and not inputs:
        raise ConfigError(f"unexpected argument {more_inputs[0]}: images to restore go after --input")
    if data is not None and paths:
        raise ConfigError("give either --data (a data file) or --input (images or folders to restore), not both")
    if data is None and not paths:
        raise ConfigError("give --data FILE (prompts to generate for) or --input PATH (images or folders to restore)")
    if paths and image_root is not None:
        raise ConfigError("--image-root applies to --data only (--input takes image paths as given)")
    if data is not None and prompt is not None:
        raise ConfigError("--prompt applies to --input only (a data file holds its own prompts)")
    from lm4lv_core.config import GenerationConfig
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.generate import generate as run_generate, restore_inputs

    attn_implementation = gen.pop("attn_implementation") or "auto"
    precision = opt.with_defaults(workers, TrainConfig)["precision"]
    gen = GenerationConfig(**opt.given(gen))
    workers = opt.workers_of(workers)
    if paths:
        show_restored(restore_inputs(run, paths, out, prompt=prompt, batch_size=batch_size, precision=precision,
                                     generation=gen, workers=workers, overwrite=overwrite, compile=compile,
                                     attn_implementation=attn_implementation, verbose=verbose,
                                     on_note=show_note, on_error=on_error, html=html))
        return
    res = run_generate(run, data, out, image_root=image_root, batch_size=batch_size, precision=precision,
                       generation=gen, workers=workers, overwrite=overwrite, compile=compile,
                       attn_implementation=attn_implementation, verbose=verbose,
                       on_note=show_note, html=html)
    show_generated(res)


def show_note(text: str) -> None:
    console.print(text, soft_wrap=True)


def show_generated(res) -> None:
    skipped = f", {res.before} already done" if res.before else ""
    console.print(f"{res.after}/{res.total} samples finished ({res.after - res.before} generated{skipped}); "
                  f"wrote {res.results}", soft_wrap=True)


def show_restored(res) -> None:
    from .cmd_data import report_failures

    skipped = f", {res.before} already done" if res.before else ""
    console.print(f"{res.after}/{res.total} images restored ({res.after - res.before} now{skipped}); "
                  f"wrote {res.out}", soft_wrap=True)
    report_failures(len(res.failures), res.out / "failures.csv", "restored")
