"""`lm4lv generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lm4lv_core.defaults import GENERATE_BATCH_SIZE
from lm4lv_core.errors import ConfigError
from lm4lv_core.precision import FP32

from . import options as opt

console = Console()


@opt.with_node_options
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
    nproc: int = typer.Option(1, "--nproc", help="Workers (processes); each sample is generated exactly once."),
    engine: str = typer.Option("deepspeed", "--engine", help="Launcher family for --nproc > 1: deepspeed | accelerate."),
    nodes: dict = None,
    precision: str = typer.Option(FP32, "--precision", help="fp32 | bf16 | fp16 (fp16 on GPU only)."),
    mode: str = typer.Option("auto", "--mode", help="image: answers start with <Img> and stop after the image; "
                             "text: free text and images; auto: image when the prompt holds <task>."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most sampled text tokens per answer (images not counted)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed", help="Seed of text sampling (per sample, independent of batching)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Regenerate every sample (deletes this folder's previous outputs; "
                                   "with --input: restores every image again)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="How inputs reach the model's size: stretch | crop [the run's, recorded at training]."),
    output_size: str = typer.Option("input", "--output-size", help="input: images at the input image's size (crop: its centre "
                                    "square's); model: at the model's square size."),
    tile: Optional[str] = typer.Option(None, "--tile", metavar="N|auto", help="Restore each input image at its own resolution "
                                       "in N px tiles (auto: the vision family's size), blended over their overlaps; "
                                       "--batch-size then counts tiles [off: resize to the model's size and back]."),
    tile_overlap: Optional[int] = typer.Option(None, "--tile-overlap", metavar="M", help="With --tile: pixels "
                                               "neighbouring tiles share [a quarter of the tile, whole patches]."),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party warnings and logs on the console too (OUT/generate.log has them always)."),
    query: bool = typer.Option(True, "--query/--no-query", help="A model trained with <query>: read each image-only "
                               "answer from its learnable query in one forward pass (--no-query: one visual token per step)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step of image-only batches (static KV cache); pays off on a GPU."),
    on_error: str = typer.Option("stop", "--on-error", help="With --input: stop: an unreadable input refuses the job, "
                                 "naming it; skip: restore the rest, list the failures in OUT/failures.csv, exit 3."),
    attn_implementation: str = typer.Option("auto", "--attn-implementation", help="The LLM's attention: auto (sdpa where the LLM's family has it, else eager) | sdpa | eager | flash_attention_2."),
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
    from lm4lv_core.engine.launch import Workers
    from lm4lv_core.model.generate import GenerationConfig
    from lm4lv_core.jobs.generate import generate as run_generate, restore_inputs

    workers = Workers(nproc=nproc, engine=engine, **opt.given(nodes))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, mode=mode, resize=resize, output_size=output_size,
                           query=query, tile=tile, tile_overlap=tile_overlap)
    if paths:
        show_restored(restore_inputs(run, paths, out, prompt=prompt, batch_size=batch_size, precision=precision,
                                     generation=gen, workers=workers, overwrite=overwrite, compile=compile,
                                     attn_implementation=attn_implementation, verbose=verbose,
                                     on_note=show_note, on_error=on_error))
        return
    res = run_generate(run, data, out, image_root=image_root, batch_size=batch_size, precision=precision,
                       generation=gen, workers=workers, overwrite=overwrite, compile=compile,
                       attn_implementation=attn_implementation, verbose=verbose,
                       on_note=show_note)
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
