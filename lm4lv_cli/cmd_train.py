"""`lm4lv train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import options as opt

console = Console()

O = typer.Option


@opt.with_train_options
def train(
    config: Optional[Path] = opt.CONFIG,
    dry_run: bool = O(False, "--dry-run", help="Validate data, images and config (the real run's checks), show "
                      "the first prompt and the memory plan, exit."),
    gpu_memory: Optional[float] = O(None, "--gpu-memory", help="With --dry-run: GPU memory in GiB to check the "
                                    "memory plan against [default: the detected GPU]."),
    options: dict = None,
) -> None:
    """Train the adapters and task tokens of LM4LV on a data file."""
    from lm4lv_core.jobs.train import dry_run as plan_run
    from lm4lv_core.jobs.train import resolve_options
    from lm4lv_core.jobs.train import train as run_train

    cfg, model = resolve_options(options, str(config) if config else None)
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
