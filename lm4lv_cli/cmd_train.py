"""`lm4lv train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import options as opt

console = Console()

O = typer.Option


def train(
    data: Optional[Path] = O(None, "--data", help="Training data file (JSON list of samples)."),
    out: Optional[Path] = O(None, "--out", help="Run directory."),
    config: Optional[Path] = opt.CONFIG,
    preset: Optional[str] = O(None, "--preset", help="Tiny offline model preset (tiny, tiny-gpt2, tiny-224)."),
    llm: Optional[str] = O(None, "--llm", help="Causal LM: a folder or a Hugging Face id org/name[@revision] (fetched into the HF cache)."),
    mae: Optional[str] = O(None, "--mae", help="MAE (ViTMAEForPreTraining): a folder or a Hugging Face id org/name[@revision]."),
    mae_decoder: Optional[str] = O(None, "--mae-decoder", help="MAE folder or Hugging Face id for the decoder (default: --mae)."),
    vision_config: Optional[str] = O(None, "--vision-config", help="YAML naming encoder/decoder/adapters."),
    image_root: Optional[Path] = O(None, "--image-root", help="Base of relative image paths (default: the data file's folder)."),
    template: Optional[str] = O(None, "--template", help="default | vicuna_v1.1 | llama2 | simple | chat_template"),
    gpt_prefix: Optional[str] = O(None, "--gpt-prefix", help="Prefix added to every gpt answer, masked from the loss."),
    num_task_tokens: Optional[int] = O(None, "--num-task-tokens", help="K learnable task embeddings per <task>."),
    vision_loss: Optional[str] = O(None, "--vision-loss", help="feature_mse (the paper's) | pixel_l1 (through the decoder) [feature_mse]."),
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
    lora_targets: Optional[str] = O(None, "--lora-targets", help="Comma-separated LLM module names [q_proj,v_proj]."),
    engine: Optional[str] = opt.ENGINE,
    launcher: Optional[str] = opt.LAUNCHER,
    nproc: Optional[int] = opt.NPROC,
    num_nodes: Optional[int] = opt.NUM_NODES,
    hostfile: Optional[str] = opt.HOSTFILE,
    master_port: Optional[int] = opt.MASTER_PORT,
    zero_stage: Optional[int] = opt.ZERO_STAGE,
    deepspeed_config: Optional[str] = opt.DEEPSPEED_CONFIG,
    precision: Optional[str] = opt.PRECISION,
    micro_batch: Optional[int] = opt.MICRO_BATCH,
    grad_accum: Optional[int] = opt.GRAD_ACCUM,
    lr: Optional[float] = opt.LR,
    weight_decay: Optional[float] = opt.WEIGHT_DECAY,
    grad_clip: Optional[float] = opt.GRAD_CLIP,
    warmup_ratio: Optional[float] = opt.WARMUP_RATIO,
    lr_schedule: Optional[str] = opt.LR_SCHEDULE,
    epochs: Optional[int] = opt.EPOCHS,
    max_steps: Optional[int] = opt.MAX_STEPS,
    stop_after: Optional[int] = opt.STOP_AFTER,
    save_every: Optional[int] = opt.SAVE_EVERY,
    keep_checkpoints: Optional[int] = opt.KEEP_CHECKPOINTS,
    preview_every: Optional[int] = opt.PREVIEW_EVERY,
    seed: Optional[int] = opt.SEED,
    cache_features: Optional[bool] = O(None, "--cache-features/--no-cache-features", help="Encode each image once (frozen encoder only)."),
    num_workers: Optional[int] = opt.NUM_WORKERS,
    resume: bool = opt.RESUME,
    overwrite: bool = opt.OVERWRITE,
    dry_run: bool = O(False, "--dry-run", help="Validate data, images and config, show the first prompt, exit."),
    resize: Optional[str] = O(None, "--resize", help="How images reach the model's square size: stretch "
                              "(as the reference) | crop (centre square); recorded for generate [stretch]."),
    report_to: Optional[str] = opt.REPORT_TO,
    verbose: bool = opt.VERBOSE,
    system_prompt: Optional[str] = O(None, "--system-prompt", help="System message before the conversation [none, as the reference]."),
    gradient_checkpointing: Optional[bool] = opt.GRADIENT_CHECKPOINTING,
    attn_implementation: Optional[str] = O(None, "--attn-implementation", help="The LLM's attention: sdpa | eager | flash_attention_2 [sdpa]."),
    gpu_memory: Optional[float] = O(None, "--gpu-memory", help="With --dry-run: GPU memory in GiB to check the memory plan against [the detected GPU]."),
) -> None:
    """Train the adapters and task tokens of LM4LV on a data file."""
    options = {k: v for k, v in locals().items() if k not in ("config", "dry_run", "gpu_memory")}
    from lm4lv_core.engine.options import resolve_options

    options["resume"] = resume or None
    options["overwrite"] = overwrite or None
    options["verbose"] = verbose or None
    for key in ("data", "out", "image_root"):
        options[key] = str(options[key]) if options[key] is not None else None
    cfg, model = resolve_options(options, str(config) if config else None)
    if gpu_memory is not None and gpu_memory <= 0:
        from lm4lv_core.errors import ConfigError

        raise ConfigError(f"--gpu-memory must be > 0 (GiB), got {gpu_memory}")
    if dry_run:
        _dry_run(cfg, model, gpu_memory)
        return
    from lm4lv_core.engine.run import train as run_train

    summary = run_train(cfg, model)
    console.print(f"[green]done[/green]: {cfg.out}" + (f" (step {summary['step']})" if summary else ""))


def _dry_run(cfg, model, gpu_memory: float | None) -> None:
    from lm4lv_core.data.format import load_checked
    from lm4lv_core.memplan import detected_gpu_memory_gib, format_plan, plan_training
    from lm4lv_core.prompt import render_first_prompt

    samples = load_checked(cfg.data, image_root=cfg.image_root, mode="train")
    text, tokens, counts = render_first_prompt(model, samples[0])
    console.print(f"[green]ok[/green]: {len(samples)} samples in {cfg.data}, all images readable")
    console.rule("first sample, rendered")
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.rule("its tokens («trained»)")
    console.print(tokens, markup=False, highlight=False, soft_wrap=True)
    console.rule()
    console.print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    plan = plan_training(cfg, model, samples, gpu_memory if gpu_memory is not None else detected_gpu_memory_gib())
    console.print(format_plan(plan), markup=False, highlight=False, soft_wrap=True)
