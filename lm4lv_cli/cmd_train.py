"""`lm4lv train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lm4lv_core.config import TEMPLATES

from . import options as opt

console = Console()

O = typer.Option


@opt.with_run_options
def train(
    data: Optional[Path] = O(None, "--data", help="Training data file (JSON list of samples)."),
    out: Optional[Path] = O(None, "--out", help="Run directory."),
    config: Optional[Path] = opt.CONFIG,
    preset: Optional[str] = O(None, "--preset", help="Tiny offline model preset (tiny, tiny-gpt2, tiny-64, tiny-224; tiny-vq: VQGAN codes; tiny-sdvae: latent VAE)."),
    llm: Optional[str] = O(None, "--llm", help="Causal LM: a folder or a Hugging Face id org/name[@revision] (fetched into the HF cache)."),
    mae: Optional[str] = O(None, "--mae", help="MAE (ViTMAEForPreTraining): a folder or a Hugging Face id org/name[@revision]."),
    mae_decoder: Optional[str] = O(None, "--mae-decoder", help="MAE folder or Hugging Face id for the decoder (default: --mae)."),
    vision_config: Optional[str] = O(None, "--vision-config", help="YAML naming encoder/decoder/adapters."),
    encoder: Optional[str] = O(None, "--encoder", help="Vision encoder FAMILY:SOURCE, e.g. mae:facebook/vit-mae-large, vqgan-codes:./vq-f16, clip:ID, timm:NAME[:CHECKPOINT] (see docs/vision.md)."),
    decoder: Optional[str] = O(None, "--decoder", help="Vision decoder FAMILY:SOURCE, or none (text answers only) [the encoder's family when it decodes]."),
    adapter: Optional[str] = O(None, "--adapter", help="Input adapter: linear | mlp | lowrank | identity (features; identity: the visual width must equal the LLM's) | embedding (codes) [the family's: linear for features, embedding for codes]."),
    num_visual_tokens: Optional[int] = O(None, "--num-visual-tokens", help="Keep N of each image's visual tokens (understanding; a truncated model cannot paint) [all]."),
    token_select: Optional[str] = O(None, "--token-select", help="Which N tokens --num-visual-tokens keeps: first (a leading run) | strided (evenly spread) [first]."),
    deadapter: Optional[str] = O(None, "--deadapter", help="Output adapter: linear | mlp | lowrank | identity | pseudo_inverse (the linear adapter's pseudo-inverse, no weights of its own) [linear]."),
    image_root: Optional[Path] = O(None, "--image-root", help="Base of relative image paths (default: the data file's folder)."),
    template: Optional[str] = O(None, "--template", help=" | ".join(TEMPLATES)),
    gpt_prefix: Optional[str] = O(None, "--gpt-prefix", help="Prefix added to every gpt answer, masked from the loss."),
    num_task_tokens: Optional[int] = O(None, "--num-task-tokens", help="K learnable task embeddings per <task>."),
    vision_loss: Optional[str] = O(None, "--vision-loss", help="feature_mse (the paper's) | pixel_l1 (through the decoder) | code_ce (codes) [the family's]."),
    vision_loss_weight: Optional[float] = O(None, "--vision-loss-weight", help="Weight of the vision loss [1.0]."),
    text_loss_weight: Optional[float] = O(None, "--text-loss-weight", help="Weight of the text loss on gpt tokens [1.0]."),
    train_adapter: Optional[bool] = O(None, "--train-adapter/--freeze-adapter", help="Train the input adapter [train]."),
    train_deadapter: Optional[bool] = O(None, "--train-deadapter/--freeze-deadapter", help="Train the output adapter [train]."),
    train_encoder: Optional[bool] = O(None, "--train-encoder/--freeze-encoder", help="Train the vision encoder [frozen]."),
    train_decoder: Optional[bool] = O(None, "--train-decoder/--freeze-decoder", help="Train the vision decoder [frozen]."),
    lora: Optional[bool] = O(None, "--lora/--no-lora", help="Add LoRA adapters to the LLM [off]."),
    lora_r: Optional[int] = O(None, "--lora-r", help="LoRA rank [8]."),
    lora_alpha: Optional[int] = O(None, "--lora-alpha", help="LoRA alpha [16]."),
    lora_dropout: Optional[float] = O(None, "--lora-dropout", help="LoRA dropout [0.05]."),
    lora_targets: Optional[str] = O(None, "--lora-targets", help="Comma-separated LLM module names [the LLM family's: PEFT's default targets, e.g. q_proj,v_proj for Llama]."),
    train_query: Optional[bool] = O(None, "--train-query/--freeze-query", help="Train the learnable query of <query> answers [train, when the data holds <query>]."),
    init_from: Optional[str] = O(None, "--init-from", help="Start from the trained weights of a run, RUN/checkpoints/step-N, a saved model or a reference pytorch_model*.pt (loaded where names and shapes match; step 0, fresh optimizer; not over --resume)."),
    run_options: dict = None,
    cache_features: Optional[bool] = O(None, "--cache-features/--no-cache-features", help="Encode each image once (frozen encoder only)."),
    dry_run: bool = O(False, "--dry-run", help="Validate data, images and config, show the first prompt, exit."),
    resize: Optional[str] = O(None, "--resize", help="How images reach the model's square size: stretch "
                              "(as the reference) | crop (centre square); recorded for generate [stretch]."),
    system_prompt: Optional[str] = O(None, "--system-prompt", help="System message before the conversation [none, as the reference]."),
    attn_implementation: Optional[str] = O(None, "--attn-implementation", help="The LLM's attention: auto (sdpa where the LLM's family has it, else eager) | sdpa | eager | flash_attention_2 [auto]."),
    gpu_memory: Optional[float] = O(None, "--gpu-memory", help="With --dry-run: GPU memory in GiB to check the memory plan against [the detected GPU]."),
) -> None:
    """Train the adapters and task tokens of LM4LV on a data file."""
    options = {k: v for k, v in locals().items() if k not in ("config", "dry_run", "gpu_memory", "run_options")}
    from lm4lv_core.jobs.train import dry_run as plan_run
    from lm4lv_core.jobs.train import resolve_options
    from lm4lv_core.jobs.train import train as run_train

    for key in ("data", "out", "image_root"):
        options[key] = str(options[key]) if options[key] is not None else None
    cfg, model = resolve_options({**options, **run_options}, str(config) if config else None)
    if dry_run:
        _show_dry_run(plan_run(cfg, model, gpu_memory))
        return
    show_trained(cfg, run_train(cfg, model))


def show_trained(cfg, summary) -> None:
    skipped = (summary or {}).get("skipped_steps")
    skipped = f"; {skipped} step(s) skipped for a non-finite loss or gradient, see metrics.csv" if skipped else ""
    if summary and summary.get("finished") is False:  # --stop-after: a checkpoint, more steps to go
        console.print(f"[yellow]stopped[/yellow] at step {summary['step']} of {summary['total_steps']} "
                      f"(--stop-after){skipped}: {cfg.out}; continue with the same command and --resume")
        return
    console.print(f"[green]done[/green]: {cfg.out}" + (f" (step {summary['step']}{skipped})" if summary else ""))


def _show_dry_run(d) -> None:
    console.print(f"[green]ok[/green]: {d.samples} samples in {d.data}, all images readable")
    console.rule("first sample, rendered")
    console.print(d.text, markup=False, highlight=False, soft_wrap=True)
    console.rule("its tokens («trained»)")
    console.print(d.tokens, markup=False, highlight=False, soft_wrap=True)
    console.rule()
    console.print(", ".join(f"{k}: {v}" for k, v in d.counts.items()))
    console.print(d.llm, markup=False, highlight=False, soft_wrap=True)
    console.print(d.plan, markup=False, highlight=False, soft_wrap=True)
