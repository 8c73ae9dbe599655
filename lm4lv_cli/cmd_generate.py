"""`lm4lv generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()


def generate(
    run: Path = typer.Option(..., "--run", help="Training run folder (uses its final/) or a saved model folder."),
    data: Path = typer.Option(..., "--data", help="Data file: prompts ending with an empty gpt turn, or training "
                              "samples (their last answer is dropped and generated)."),
    out: Path = typer.Option(..., "--out", help="Output folder: images/, results.jsonl, generate.json."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Base of relative image paths (default: the data file's folder)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per batch and worker."),
    nproc: int = typer.Option(1, "--nproc", help="Workers (processes); each sample is generated exactly once."),
    engine: str = typer.Option("deepspeed", "--engine", help="Launcher family for --nproc > 1: deepspeed | accelerate."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="deepspeed | accelerate | torchrun [the engine's own]."),
    num_nodes: int = typer.Option(1, "--num-nodes", help="Nodes (deepspeed launcher; --out must be on a shared filesystem)."),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="Hostfile for the deepspeed launcher."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Rendezvous port [a free one]."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | fp16 (fp16 on GPU only)."),
    mode: str = typer.Option("auto", "--mode", help="image: answers start with <Img> and stop after the image; "
                             "text: free text and images; auto: image when the prompt holds <task>."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most sampled text tokens per answer (images not counted)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed", help="Seed of text sampling (per sample, independent of batching)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Regenerate every sample (deletes this folder's previous outputs)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="How inputs reach the model's size: stretch | crop [the run's, recorded at training]."),
    output_size: str = typer.Option("input", "--output-size", help="input: images at the input image's size (crop: its centre "
                                    "square's); model: at the model's square size."),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party warnings and logs on the console too (OUT/generate.log has them always)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step of image-only batches (static KV cache); pays off on a GPU."),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", help="The LLM's attention: sdpa | eager | flash_attention_2 [the model's]."),
) -> None:
    """Generate images (and text) for a data file with a trained model; re-runs skip finished samples."""
    from lm4lv_core.engine import launch
    from lm4lv_core.data.format import load_checked
    from lm4lv_core.errors import ConfigError
    from lm4lv_core.generate import GenerationConfig
    from lm4lv_core.jobs.generate import (JOB_DIR, PRECISIONS, RESULTS, finished_records, new_attempt,
                                         model_resize, output_stems, prepare_out, resolve_model_dir)

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not launch.has_cuda():
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    launcher = launcher or launch.default_launcher(engine)
    if launcher not in launch.LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(launch.LAUNCHERS)}, got {launcher!r}")
    if attn_implementation or compile:
        import torch

        from lm4lv_core.compiled_decode import check_compile_available
        from lm4lv_core.loading import check_attn_implementation, compute_dtype

        if attn_implementation:
            check_attn_implementation(attn_implementation, dtype=compute_dtype(precision))
        if compile:
            check_compile_available(torch.device("cuda" if launch.has_cuda() else "cpu"))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, mode=mode, resize=resize, output_size=output_size)
    model_dir = resolve_model_dir(run)
    gen.resize = gen.resize or model_resize(model_dir)
    data, out = data.resolve(), out.resolve()
    image_root = image_root.resolve() if image_root else None
    samples = load_checked(data, image_root=image_root, mode="generate")
    dropped = sum(s.answer_dropped for s in samples)
    if dropped:
        console.print(f"note: {dropped} of {len(samples)} samples in {data} end with an answer (training format); "
                      "each last answer is dropped and generated", soft_wrap=True)
    job = {"model": str(model_dir), "data": str(data), "image_root": str(image_root) if image_root else None,
           "out": str(out), "batch_size": batch_size, "precision": precision, "generation": vars(gen).copy(),
           "attempt": new_attempt(), "compile": compile, "attn_implementation": attn_implementation}
    from lm4lv_core.util.runlock import hold

    with hold(out, "generate"):  # one run per folder; removes temporary files of killed runs
        prepare_out(out, job, overwrite)
        stems = output_stems(samples)
        before = len(finished_records(out, samples, stems))
        launch.run_job("generate", job, nproc=nproc, engine=engine, launcher=launcher, num_nodes=num_nodes,
                       hostfile=hostfile, master_port=master_port, job_dir=out / JOB_DIR,
                       log_file=out / "generate.log", verbose=verbose)
        after = len(finished_records(out, samples, stems))
    skipped = f", {before} already done" if before else ""
    console.print(f"{after}/{len(samples)} samples finished ({after - before} generated{skipped}); "
                  f"wrote {out / RESULTS}", soft_wrap=True)
