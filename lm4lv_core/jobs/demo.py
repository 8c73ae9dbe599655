"""``lm4lv demo``: a local web app (Gradio) that restores an uploaded image with a run.

The restoration is the one ``lm4lv generate --input`` does (:func:`lm4lv_core.model.restore.restore_items`
with the run's recorded restoration prompt and size policy, on the device a worker would use), so a
file restored here equals the same file restored from the command line.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import ConfigError
from ..precision import FP32

DEFAULT_PORT = 7860
LOCAL_HOST = "127.0.0.1"


@dataclass
class DemoConfig:
    """The options of ``lm4lv demo`` besides ``--run`` and ``--precision`` (the training runs')."""

    port: int = option(DEFAULT_PORT, "Port to serve on.", panel="Launch")
    host: str = option(LOCAL_HOST, "Address to bind: 127.0.0.1 (this machine only, the default); 0.0.0.0 lets "
                       "other machines of your network open it.", panel="Launch")
    share: bool = option(False, "Also ask Gradio for a public *.gradio.live link (needs internet; anyone with the "
                         "link can use your model while it runs).", panel="Launch", flags="--share")
    examples: Path | None = option(None, "Folder of images offered as examples.", panel="Data")


class Restorer:
    """A run's model, loaded once, restoring one image file at a time."""

    def __init__(self, run: str | os.PathLike, precision: str = FP32) -> None:
        from ..model.lm4lv import LM4LV
        from ..model.restore import image_config, restore_prompt
        from ..precision import compute_dtype
        from ..util import dist
        from ..engine.model_source import find_model

        source = find_model(run)
        saved = source.model
        if saved.decoder is None:
            raise ConfigError(f"--run {run}: this model has no vision decoder (it answers in text): it cannot "
                              "restore images; give a run trained to answer with images")
        self.note = source.note
        self.gen = image_config(None)
        self.gen.resize = self.gen.resize or saved.resize
        self.prompt = restore_prompt(saved.restore_prompt, None)
        self.device = dist.device()
        self.model = LM4LV.from_pretrained(str(source.path), dtype=compute_dtype(precision),
                                           config=source.config).to(self.device).eval()
        self.out = Path(tempfile.mkdtemp(prefix="lm4lv-demo-"))
        self.count = 0

    def restore(self, image: str | os.PathLike) -> Path:
        """Restore the image file ``image``; returns the restored file (as ``generate --input`` names it)."""
        from ..data.outputs import plan_restore
        from ..model.restore import restore_items

        self.count += 1
        out = self.out / str(self.count)
        items = plan_restore([image], out)
        restore_items(self.model, items, out, self.prompt, cfg=self.gen, batch_size=1)
        return out / items[0].dst


def check_port(host: str, port: int) -> None:
    """One error line when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            why = "in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
            raise ConfigError(f"--port {port} on {host}: {why}; choose another with --port") from None


def build_app(restorer: Restorer, examples: list[str] | None = None, title: str = "lm4lv demo"):
    """The Gradio app: upload or pick an example, restore, before/after slider and a download."""
    import gradio as gr

    def run(path):
        if not path:
            raise gr.Error("upload an image first")
        out = restorer.restore(path)
        return (path, str(out)), str(out)

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nUpload a degraded image (or pick an example) and press **Restore**. "
                    f"Prompt: `{restorer.prompt}`, size policy: {restorer.gen.resize}, device: {restorer.device}.")
        with gr.Row():
            inp = gr.Image(type="filepath", label="degraded input", elem_id="input", sources=["upload"])
            slider = gr.ImageSlider(type="filepath", label="before / after", elem_id="slider")
        btn = gr.Button("Restore", variant="primary", elem_id="restore")
        dl = gr.File(label="restored image (download)", elem_id="download")
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[inp])
        btn.click(run, inputs=[inp], outputs=[slider, dl])
    return app


def example_images(folder: str | os.PathLike | None, limit: int = 12) -> list[str]:
    if not folder:
        return []
    from ..image.io import require_images

    return [str(p) for p in require_images(Path(folder))[:limit]]


def serve(run: str | os.PathLike, *, host: str = LOCAL_HOST, port: int = DEFAULT_PORT, share: bool = False,
          examples: str | os.PathLike | None = None, precision: str = FP32, on_ready=None) -> None:
    """Load the run, check the port, and serve the app until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("lm4lv demo needs Gradio: pip install 'lm4lv[demo]'") from None
    check_port(host, port)
    ex = example_images(examples)
    restorer = Restorer(run, precision)
    app = build_app(restorer, ex)
    app.queue()
    if on_ready:
        on_ready(restorer, f"http://{host}:{port}")
    app.launch(server_name=host, server_port=port, share=share, show_error=True, quiet=True,
               allowed_paths=[str(restorer.out), *ex])
