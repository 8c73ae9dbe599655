"""Reconstruction ceiling of each vision family on the quickstart's held-out images.

Every family's tiny offline model (random-initialised: no weights can be downloaded) encodes and
decodes the quickstart's held-out scikit-image pictures through ``lm4lv recon``'s core
(``reconstruct_folder``), at the family's own image size. Prints JSON: per family the token kind
and count, and mean PSNR / SSIM against the inputs. Random-initialised autoencoders show the
floor of the pipeline, not a trained family's quality; a trained MAE (``ft-mae``) and published
VQGAN / SD-VAE weights reach far higher.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recon_families.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    torch.set_num_threads(1)
    from test_vision_families import _beit_dvae

    from lm4lv_core.jobs.quickstart import export_sample_images
    from lm4lv_core.jobs.recon_mae import mean_rows, reconstruct_folder
    from lm4lv_core.sources.presets import preset_config
    from lm4lv_core.vision import token_space

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, held_out = export_sample_images(tmp / "images")
        families = {"mae (tiny-64)": preset_config("tiny-64"), "vqgan-codes (tiny-vq)": preset_config("tiny-vq"),
                    "sd-vae (tiny-sdvae)": preset_config("tiny-sdvae"), "beit + dvae (tiny)": _beit_dvae(tmp)}
        out = {}
        for name, cfg in families.items():
            torch.manual_seed(0)
            rows = reconstruct_folder(cfg.encoder, cfg.decoder, held_out, tmp / "recon" / name)
            space = token_space(cfg.encoder)
            out[name] = {"tokens": space.num_tokens, "kind": space.kind, "image_size": space.image_size,
                         "images": len(rows), **{k: round(v, 3) for k, v in mean_rows(rows).items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
