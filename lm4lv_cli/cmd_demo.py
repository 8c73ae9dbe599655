"""`lm4lv demo`: restore uploaded images in the browser (Gradio)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lm4lv_core.jobs.demo import DEFAULT_PORT, LOCAL_HOST
from lm4lv_core.precision import FP32


def demo(
    run: Path = typer.Option(..., "--run", help="Training run (its final/ or newest checkpoint) or saved model folder."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to serve on."),
    host: str = typer.Option(LOCAL_HOST, "--host", help="Address to bind: 127.0.0.1 (this machine only, the "
                             "default); 0.0.0.0 lets other machines of your network open it."),
    share: bool = typer.Option(False, "--share", help="Also ask Gradio for a public *.gradio.live link (needs "
                               "internet; anyone with the link can use your model while it runs)."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="Folder of images offered as examples."),
    precision: str = typer.Option(FP32, "--precision", help="fp32 | bf16 | fp16 (fp16 needs a GPU)."),
) -> None:
    """A local web app: upload a degraded image (or pick an example), get it restored with the run's
    recorded prompt and size policy, compare before/after with a slider, download the result."""
    from lm4lv_core.jobs.demo import serve

    def ready(restorer, url: str) -> None:
        if restorer.note:
            typer.echo(restorer.note)
        typer.echo(f"lm4lv demo on {url} (prompt {restorer.prompt!r}, {restorer.gen.resize}, {restorer.device}); "
                   "Ctrl-C stops it" + ("" if share or host != LOCAL_HOST else
                                        "; --host 0.0.0.0 or --share to open it from elsewhere"))

    serve(run, host=host, port=port, share=share, examples=examples, precision=precision, on_ready=ready)
