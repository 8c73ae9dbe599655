"""`lm4lv demo`: restore uploaded images in the browser (Gradio)."""

from __future__ import annotations

from pathlib import Path

import typer

from lm4lv_core.jobs.demo import LOCAL_HOST

from . import options as opt


@opt.with_demo_options
def demo(
    run: Path = typer.Option(..., "--run", help="Training run (its final/ or newest checkpoint) or saved model folder."),
    options: dict = None,
) -> None:
    """A local web app: upload a degraded image (or pick an example), get it restored with the run's
    recorded prompt and size policy, compare before/after with a slider, download the result."""
    from lm4lv_core.engine.config import TrainConfig
    from lm4lv_core.jobs.demo import DemoConfig, serve

    o = opt.with_defaults(options, DemoConfig, TrainConfig)
    host, share = o["host"], o["share"]

    def ready(restorer, url: str) -> None:
        if restorer.note:
            typer.echo(restorer.note)
        typer.echo(f"lm4lv demo on {url} (prompt {restorer.prompt!r}, {restorer.gen.resize}, {restorer.device}); "
                   "Ctrl-C stops it" + ("" if share or host != LOCAL_HOST else
                                        "; --host 0.0.0.0 or --share to open it from elsewhere"))

    serve(run, host=host, port=o["port"], share=share, examples=o["examples"], precision=o["precision"],
          on_ready=ready)
