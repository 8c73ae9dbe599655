"""`lm4lv train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lm4lv_core.errors import LM4LVError

console = Console()


def train(
    data: Path = typer.Option(..., "--data", help="Training data file (JSON list of samples)."),
    out: Path = typer.Option(..., "--out", help="Run directory."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Tiny offline model preset (tiny, tiny-gpt2, tiny-224)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Hugging Face causal LM folder."),
    mae: Optional[str] = typer.Option(None, "--mae", help="MAE (ViTMAEForPreTraining) folder."),
    mae_decoder: Optional[str] = typer.Option(None, "--mae-decoder", help="MAE folder for the decoder (default: --mae)."),
    vision_config: Optional[str] = typer.Option(None, "--vision-config", help="YAML naming encoder/decoder/adapters."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Base of relative image paths (default: the data file's folder)."),
    template: Optional[str] = typer.Option(None, "--template", help="default | vicuna_v1.1 | llama2 | simple | chat_template"),
    gpt_prefix: Optional[str] = typer.Option(None, "--gpt-prefix", help="Prefix added to every gpt answer, masked from the loss."),
    num_task_tokens: Optional[int] = typer.Option(None, "--num-task-tokens", help="K learnable task embeddings per <task>."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate data, images and config, show the first prompt, exit."),
) -> None:
    """Train the adapters and task tokens of LM4LV on a data file."""
    from lm4lv_core.data.format import load_checked
    from lm4lv_core.presets import resolve_model_config
    from lm4lv_core.prompt import render_first_prompt

    cfg = resolve_model_config(preset=preset, llm=llm, mae=mae, mae_decoder=mae_decoder,
                               vision_config=vision_config, template=template, gpt_prefix=gpt_prefix,
                               num_task_tokens=num_task_tokens)
    samples = load_checked(data, image_root=image_root, mode="train")
    if dry_run:
        text, counts = render_first_prompt(cfg, samples[0])
        console.print(f"[green]ok[/green]: {len(samples)} samples in {data}, all images readable")
        console.rule("first sample, rendered")
        console.print(text, markup=False, highlight=False)
        console.rule()
        console.print(", ".join(f"{k}: {v}" for k, v in counts.items()))
        return
    raise LM4LVError("training without --dry-run is not available in this version yet")
