"""`lm4lv generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lm4lv_core.defaults import GENERATE_BATCH_SIZE
from lm4lv_core.errors import ConfigError

from . import options as opt

console = Console()


@opt.with_worker_options
@opt.with_generation_options
def generate(
    run: Path = typer.Option(..., "--run", help="Training run folder (uses its final/) or a saved model folder."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data file: prompts ending with an empty gpt turn, or training "
                                        "samples (their last answer is dropped and generated)."),
    inputs: Optional[list[Path]] = typer.Option(None, "--input", "-i", metavar="PATH", help="Instead of --data: images or folders "
                                                "(searched recursively) to restore, --input PATH [PATH ...]; "
                                                "outputs mirror their paths under --out."),
    more_inputs: Optional[list[Path]] = typer.Argument(None, hidden=True, metavar="PATH"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="With --input: the restoration prompt, <image> = the "
                                         "image [the one recorded by training]."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: images/, results.jsonl, generate.json (with --input: "
                             "the restored images at their inputs' relative paths, and generate.json)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Base of relative image paths (default: the data file's folder)."),
    batch_size: int = typer.Option(GENERATE_BATCH_SIZE, "--batch-size", help="Samples per batch and worker."),
    workers: dict = None,
    gen: dict = None,
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a comparison page (open it from disk): each "
                                        "input beside what lm4lv made of it, and the ground truth with PSNR / SSIM "
                                        "for training samples whose image answer was generated."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Regenerate every sample (deletes this folder's previous outputs; "
                                   "with --input: restores every image again)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party warnings and logs on the console too (OUT/generate.log has them always)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step of image-only batches (static KV cache); pays off on a GPU."),
    on_error: str = typer.Option("stop", "--on-error", help="With --input: stop: an unreadable input refuses the job, "
                                 "naming it; skip: restore the rest, list the failures in OUT/failures.csv, exit 3."),
) -> None:
    """Generate images (and text) for a data file with a trained model, or restore image files and
    folders (--input); re-runs skip finished samples and images."""
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
