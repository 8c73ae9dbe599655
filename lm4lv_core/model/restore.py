"""Restoring image files with a loaded model: ``restore_folder(model, src, dst)`` restores every
image of a folder (recursively) into a mirrored folder, as ``lm4lv generate --input`` does on each
of its workers (:func:`restore_items`).

Each image becomes a one-turn conversation, the restoration prompt (``<image>`` = the image)
answered in image-only mode; the restored image is written at the input's size (see
``GenerationConfig.output_size``), in the input's format family (:func:`lm4lv_core.data.outputs.restored_name`),
atomically, so an output that exists is finished.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..data.format import IMAGE_TOKEN, Sample, parse_sample
from ..data.outputs import RestoreItem, plan_restore
from ..defaults import GENERATE_BATCH_SIZE
from ..errors import ConfigError
from .generate import GenerationConfig, generate_samples, output_image


def restore_prompt(model_prompt: str | None, prompt: str | None = None) -> str:
    """The prompt to restore with: ``prompt`` if given, else the model's recorded one
    (``ModelConfig.restore_prompt``); it must hold exactly one ``<image>``."""
    chosen = prompt if prompt is not None else model_prompt
    if chosen is None:
        raise ConfigError("this model has no recorded restoration prompt (its training data held no sample "
                          "'<image> ... <task>' answered by an image, or it was saved before lm4lv recorded "
                          "prompts); pass --prompt, e.g. --prompt '<image> <task>'")
    if chosen.count(IMAGE_TOKEN) != 1:
        raise ConfigError(f"--prompt must hold exactly one {IMAGE_TOKEN} (the image to restore), got {chosen!r}")
    return chosen


def image_config(cfg: GenerationConfig | None) -> GenerationConfig:
    """``cfg`` in image-only mode (``auto`` becomes ``image``; ``text`` cannot restore)."""
    cfg = cfg or GenerationConfig()
    if cfg.mode == "text":
        raise ConfigError("--mode text cannot restore images (--input writes one image per input); "
                          "use --mode image or auto")
    return dataclasses.replace(cfg, mode="image")


def restore_samples(items: Sequence[RestoreItem], prompt: str) -> list[Sample]:
    """One generation sample per item: ``prompt`` with the item's image, keyed by ``item.key``."""
    return [parse_sample({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                          "image": [it.src]}, it.key, source="--input") for it in items]


def restore_items(model, items: Sequence[RestoreItem], out: str | os.PathLike, prompt: str, *,
                  cfg: GenerationConfig | None = None, batch_size: int = GENERATE_BATCH_SIZE,
                  compile: bool = False, on_batch: Callable[..., None] | None = None, on_tiles: bool = False) -> None:
    """Restore ``items`` with a loaded model (in eval mode) into ``out``, batch by batch;
    ``on_batch(n)`` is called after each batch's ``n`` images are written (with ``cfg.tile`` and
    ``on_tiles``: ``on_batch(tiles, images)``, the batch's tiles and the images it finished)."""
    from ..image.io import oriented_size, save_image

    cfg = image_config(cfg)
    out = Path(out)
    by_key = {it.key: it for it in items}

    def write(chunk: list[Sample], outs) -> None:
        for s, o in zip(chunk, outs):
            it = by_key[s.index]
            if not o.images:
                raise ConfigError(f"{it.src}: the model produced no image")
            save_image(output_image(o.images[0], oriented_size(it.src), cfg, model), out / it.dst)
        if on_batch is not None:
            on_batch(len(chunk))

    if cfg.tile is not None:  # at native resolution, tiles of many images batched together
        from PIL import Image

        from .tiled import generate_tiled, model_tiling

        def write_tiled(i: int, s: Sample, pixels) -> None:
            save_image(Image.fromarray(pixels), out / by_key[s.index].dst)

        generate_tiled(model, restore_samples(items, prompt), cfg, model_tiling(model, cfg), batch_size=batch_size,
                       on_image=write_tiled, compile=compile,
                       on_batch=(lambda tiles, images: on_batch(tiles, images)) if on_tiles and on_batch else
                       (lambda tiles, images: on_batch(images)) if on_batch else None)
        return
    generate_samples(model, restore_samples(items, prompt), cfg, batch_size=batch_size, on_batch=write,
                     compile=compile)


@dataclass
class RestoreCount:
    """Images of a restoration: ``restored`` now, ``skipped`` (their outputs existed), ``total``."""

    restored: int
    skipped: int
    total: int


def restore_folder(model, src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
                   prompt: str | None = None, overwrite: bool = False, batch_size: int = GENERATE_BATCH_SIZE,
                   cfg: GenerationConfig | None = None) -> RestoreCount:
    """Restore the images of ``src`` (a folder, searched recursively, an image, or a list of them)
    into ``dst``, mirroring their relative paths (:func:`lm4lv_core.data.outputs.plan_restore`).

    ``prompt``: the human turn (default: the model's recorded restoration prompt). Images whose
    output exists are skipped unless ``overwrite``. ``cfg.tile``: restore each image at its own
    resolution in tiles (``batch_size`` then counts tiles). Returns the counts.
    """
    prompt = restore_prompt(model.config.restore_prompt, prompt)
    cfg = image_config(cfg)
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    items = plan_restore(sources, dst)
    todo = items if overwrite else [it for it in items if not (Path(dst) / it.dst).is_file()]
    was_training = model.training
    model.eval()
    try:
        restore_items(model, todo, dst, prompt, cfg=cfg, batch_size=batch_size)
    finally:
        model.train(was_training)
    return RestoreCount(len(todo), len(items) - len(todo), len(items))
