"""`lm4lv import-reference`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lm4lv_core.config import TEMPLATES

console = Console()

O = typer.Option


def import_reference(
    checkpoint: Path = typer.Argument(..., metavar="PT", help="The reference's delta checkpoint (pytorch_model.pt or pytorch_model_epN.pt)."),
    out: Path = O(..., "--out", "-o", help="The lm4lv saved model folder to write (use it with lm4lv generate --run)."),
    config_from: Optional[Path] = O(None, "--config-from", help="Take the model (LLM, vision parts, adapters, template, LoRA) from an lm4lv run, checkpoint or saved model folder; its weights are not used."),
    preset: Optional[str] = O(None, "--preset", help="Tiny offline model preset."),
    llm: Optional[str] = O(None, "--llm", help="The checkpoint's causal LM: a folder or a Hugging Face id."),
    mae: Optional[str] = O(None, "--mae", help="MAE encoder and decoder: a folder or a Hugging Face id."),
    mae_decoder: Optional[str] = O(None, "--mae-decoder", help="MAE for the decoder (default: --mae)."),
    vision_config: Optional[str] = O(None, "--vision-config", help="The vision YAML the checkpoint was trained with (the reference's stage2_*.yaml or lm4lv's)."),
    encoder: Optional[str] = O(None, "--encoder", help="Vision encoder FAMILY:SOURCE."),
    decoder: Optional[str] = O(None, "--decoder", help="Vision decoder FAMILY:SOURCE, or none."),
    adapter: Optional[str] = O(None, "--adapter", help="Input adapter [the family's]."),
    deadapter: Optional[str] = O(None, "--deadapter", help="Output adapter [linear]."),
    template: Optional[str] = O(None, "--template", help=" | ".join(TEMPLATES) + " [default, the reference's]."),
    gpt_prefix: Optional[str] = O(None, "--gpt-prefix", help="The --gpt_prefix it was trained with (e.g. 'A picture of')."),
    system_prompt: Optional[str] = O(None, "--system-prompt", help="System message [none]."),
    lora: Optional[bool] = O(None, "--lora/--no-lora", help="The checkpoint holds LoRA weights [off]."),
    lora_r: Optional[int] = O(None, "--lora-r", help="Its lora_r."),
    lora_alpha: Optional[int] = O(None, "--lora-alpha", help="Its lora_alpha."),
    lora_targets: Optional[str] = O(None, "--lora-targets", help="Its lora_target_modules, comma-separated."),
    overwrite: bool = O(False, "--overwrite", help="Replace --out."),
) -> None:
    """Turn a reference delta checkpoint into an lm4lv saved model folder."""
    from lm4lv_core.jobs.import_reference import import_reference as run_import

    options = {k: v for k, v in locals().items() if k not in ("checkpoint", "out", "config_from", "overwrite")}
    line = run_import(str(checkpoint), str(out), options, str(config_from) if config_from else None, overwrite)
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"[green]done[/green]: {out} (lm4lv generate --run {out} ...)", soft_wrap=True)
