"""`lm4lv train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()

O = typer.Option


def train(
    data: Optional[Path] = O(None, "--data", help="Training data file (JSON list of samples)."),
    out: Optional[Path] = O(None, "--out", help="Run directory."),
    config: Optional[Path] = O(None, "--config", help="YAML file holding any of these options (the command line overrides it)."),
    preset: Optional[str] = O(None, "--preset", help="Tiny offline model preset (tiny, tiny-gpt2, tiny-224)."),
    llm: Optional[str] = O(None, "--llm", help="Hugging Face causal LM folder."),
    mae: Optional[str] = O(None, "--mae", help="MAE (ViTMAEForPreTraining) folder."),
    mae_decoder: Optional[str] = O(None, "--mae-decoder", help="MAE folder for the decoder (default: --mae)."),
    vision_config: Optional[str] = O(None, "--vision-config", help="YAML naming encoder/decoder/adapters."),
    image_root: Optional[Path] = O(None, "--image-root", help="Base of relative image paths (default: the data file's folder)."),
    template: Optional[str] = O(None, "--template", help="default | vicuna_v1.1 | llama2 | simple | chat_template"),
    gpt_prefix: Optional[str] = O(None, "--gpt-prefix", help="Prefix added to every gpt answer, masked from the loss."),
    num_task_tokens: Optional[int] = O(None, "--num-task-tokens", help="K learnable task embeddings per <task>."),
    train_adapter: Optional[bool] = O(None, "--train-adapter/--freeze-adapter", help="Train the input adapter [train]."),
    train_deadapter: Optional[bool] = O(None, "--train-deadapter/--freeze-deadapter", help="Train the output adapter [train]."),
    train_encoder: Optional[bool] = O(None, "--train-encoder/--freeze-encoder", help="Train the vision encoder [frozen]."),
    train_decoder: Optional[bool] = O(None, "--train-decoder/--freeze-decoder", help="Train the vision decoder [frozen]."),
    lora: Optional[bool] = O(None, "--lora/--no-lora", help="Add LoRA adapters to the LLM [off]."),
    lora_r: Optional[int] = O(None, "--lora-r", help="LoRA rank [8]."),
    lora_alpha: Optional[int] = O(None, "--lora-alpha", help="LoRA alpha [16]."),
    lora_dropout: Optional[float] = O(None, "--lora-dropout", help="LoRA dropout [0.05]."),
    lora_targets: Optional[str] = O(None, "--lora-targets", help="Comma-separated LLM module names [q_proj,v_proj]."),
    engine: Optional[str] = O(None, "--engine", help="deepspeed | accelerate [deepspeed]."),
    launcher: Optional[str] = O(None, "--launcher", help="deepspeed | accelerate | torchrun [the engine's own]."),
    nproc: Optional[int] = O(None, "--nproc", help="Workers on this node [1: in-process]."),
    num_nodes: Optional[int] = O(None, "--num-nodes", help="Nodes (passed to the deepspeed launcher) [1]."),
    hostfile: Optional[str] = O(None, "--hostfile", help="Hostfile for the deepspeed launcher."),
    master_port: Optional[int] = O(None, "--master-port", help="Rendezvous port [a free one]."),
    zero_stage: Optional[int] = O(None, "--zero-stage", help="DeepSpeed ZeRO stage 0|1|2|3 [0]."),
    deepspeed_config: Optional[str] = O(None, "--deepspeed-config", help="JSON/YAML merged over the generated DeepSpeed config."),
    precision: Optional[str] = O(None, "--precision", help="fp32 | bf16 | fp16 [fp32]."),
    micro_batch: Optional[int] = O(None, "--micro-batch", help="Samples per worker per micro-step [4]."),
    grad_accum: Optional[int] = O(None, "--grad-accum", help="Micro-steps per optimizer step [1]."),
    lr: Optional[float] = O(None, "--lr", help="Peak learning rate [3e-4]."),
    weight_decay: Optional[float] = O(None, "--weight-decay", help="AdamW weight decay [0]."),
    grad_clip: Optional[float] = O(None, "--grad-clip", help="Gradient norm clip, 0 = off [1.0]."),
    warmup_ratio: Optional[float] = O(None, "--warmup-ratio", help="Linear warmup share of all steps, then cosine decay [0.1]."),
    epochs: Optional[int] = O(None, "--epochs", help="Passes over the data [1]."),
    max_steps: Optional[int] = O(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    stop_after: Optional[int] = O(None, "--stop-after", help="Stop with a checkpoint after this many steps (resume later)."),
    save_every: Optional[int] = O(None, "--save-every", help="Checkpoint every N steps [500]."),
    keep_checkpoints: Optional[int] = O(None, "--keep-checkpoints", help="Newest checkpoints kept, 0 = all [3]."),
    preview_every: Optional[int] = O(None, "--preview-every", help="Preview image every N steps [200]."),
    seed: Optional[int] = O(None, "--seed", help="Seed of initialisation and data order [0]."),
    cache_features: Optional[bool] = O(None, "--cache-features/--no-cache-features", help="Encode each image once (frozen encoder only)."),
    num_workers: Optional[int] = O(None, "--num-workers", help="Data loading processes per worker [0]."),
    resume: bool = O(False, "--resume", help="Continue the run in --out from its last complete checkpoint."),
    overwrite: bool = O(False, "--overwrite", help="Reuse --out, replacing lm4lv's files in it."),
    dry_run: bool = O(False, "--dry-run", help="Validate data, images and config, show the first prompt, exit."),
) -> None:
    """Train the adapters and task tokens of LM4LV on a data file."""
    options = {k: v for k, v in locals().items() if k not in ("config", "dry_run")}
    from lm4lv_core.engine.options import resolve_options

    options["resume"] = resume or None
    options["overwrite"] = overwrite or None
    for key in ("data", "out", "image_root"):
        options[key] = str(options[key]) if options[key] is not None else None
    cfg, model = resolve_options(options, str(config) if config else None)
    if dry_run:
        _dry_run(cfg, model)
        return
    from lm4lv_core.engine.run import train as run_train

    summary = run_train(cfg, model)
    console.print(f"[green]done[/green]: {cfg.out}" + (f" (step {summary['step']})" if summary else ""))


def _dry_run(cfg, model) -> None:
    from lm4lv_core.data.format import load_checked
    from lm4lv_core.prompt import render_first_prompt

    samples = load_checked(cfg.data, image_root=cfg.image_root, mode="train")
    text, counts = render_first_prompt(model, samples[0])
    console.print(f"[green]ok[/green]: {len(samples)} samples in {cfg.data}, all images readable")
    console.rule("first sample, rendered")
    console.print(text, markup=False, highlight=False)
    console.rule()
    console.print(", ".join(f"{k}: {v}" for k, v in counts.items()))
