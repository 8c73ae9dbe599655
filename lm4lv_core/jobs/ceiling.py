"""The ceiling of a restoration: the vision family's own reconstruction of the ground truth
(encoder → decoder, no LLM). A restored image can only be as good as the decoder can paint, so
reports show this next to the degraded input and the restoration."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ModuleSpec
from ..errors import ConfigError, LM4LVError

LABEL = "ceiling"


def ceiling_parts(source: str) -> tuple[ModuleSpec, ModuleSpec]:
    """The encoder and decoder of ``source``: a training run / saved model folder (its vision
    parts, fine-tuned decoder included) or ``FAMILY:SOURCE`` as ``lm4lv recon --encoder`` takes it."""
    from .recon_mae import recon_parts

    if Path(source).is_dir():
        from ..engine.model_source import find_model

        model = find_model(source).model
        if model.decoder is None:
            raise ConfigError(f"--ceiling {source}: the run has no vision decoder (text answers only): "
                              "it cannot reconstruct images")
        return model.encoder, model.decoder
    if ":" not in source:
        raise ConfigError(f"--ceiling {source}: give FAMILY:SOURCE (e.g. mae:facebook/vit-mae-base) or a run folder")
    return recon_parts(encoder=source)


def reconstruct_ceiling(source: str, gt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Reconstruct every ground-truth image of ``gt`` (a folder) through ``source``'s encoder and
    decoder into ``out`` (same relative names, ``.png``), resized back to the ground truth's size
    where the decoder paints another size."""
    from PIL import Image

    from ..image.io import load_rgb, require_images
    from .recon_mae import reconstruct_folder

    gt, out = Path(gt), Path(out)
    if not gt.is_dir():
        raise LM4LVError(f"--ceiling needs a ground-truth folder, got {gt}")
    enc, dec = ceiling_parts(source)
    reconstruct_folder(enc, dec, gt, out)
    for f in require_images(gt):
        rec = out / f.relative_to(gt).with_suffix(".png")
        size = load_rgb(f).size
        with Image.open(rec) as im:
            if im.size == size:
                continue
            im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        im.save(rec)
    return out
