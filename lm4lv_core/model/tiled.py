"""Tiled generation: restoring images at their own resolution (``--tile N|auto``).

Each sample's input image is cut into tiles (:mod:`lm4lv_core.image.tiles`); every tile becomes a
copy of its sample with the tile as its image, and the tiles of many images fill the generation
batches together (``batch_size`` counts tiles). Each batch entry carries its image's position
in the work list and its tile number, so a restored tile is only ever added to its own image's
canvas; an image is handed to ``on_image`` as soon as its last tile is in. Images are read one at
a time as their tiles are needed, so memory holds the batch, the images whose tiles are in flight
and one output canvas each.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..data.dataset import collate
from ..data.format import IMAGE_TOKEN, Sample
from ..errors import ConfigError
from ..image.io import load_rgb
from ..image.tiles import Canvas, Tiling, cut_tile, family_patch, plan_tiles, resolve_tiling

TILE_KEY = "tile:"  # the image path of a tile sample: tile:<work position>:<tile number>


def model_tiling(model, cfg) -> Tiling | None:
    """``cfg.tile`` / ``cfg.tile_overlap`` resolved against a loaded model (``None``: tiling off)."""
    if getattr(cfg, "tile", None) is None:
        return None
    from .generate import check_decodable

    if model.decoder is None:
        raise ConfigError("--tile restores images, but this model cannot paint (it has no vision decoder)")
    check_decodable(model, model.num_visual_tokens)
    enc = model.encoder
    return resolve_tiling(cfg.tile, cfg.tile_overlap, enc.image_size, family_patch(enc.num_tokens, enc.image_size))


def config_tiling(model_config, cfg) -> Tiling | None:
    """The same from a saved model's config alone (the parent checks before any output is written):
    a family that cannot paint, a tile smaller than its patch or an overlap >= the tile is a
    one-line ``ConfigError``."""
    if getattr(cfg, "tile", None) is None:
        if getattr(cfg, "tile_overlap", None) is not None:
            raise ConfigError("--tile-overlap needs --tile N|auto")
        return None
    from ..vision import cannot_paint, token_space

    space = token_space(model_config.encoder)
    why = cannot_paint(model_config, space)
    if why:
        raise ConfigError(f"--tile restores images, but this model cannot paint: {why}")
    return resolve_tiling(cfg.tile, cfg.tile_overlap, space.image_size, family_patch(space.num_tokens, space.image_size))


def check_tile_samples(samples: Sequence[Sample]) -> None:
    """Each tiled sample restores exactly one image: its prompt holds one ``<image>``."""
    for s in samples:
        n = sum(t.value.count(IMAGE_TOKEN) for t in s.turns if t.role != "gpt")
        if n != 1:
            raise ConfigError(f"sample {s.index}: --tile restores one image per sample, but its prompt holds {n}")


def _tile_key(pos: int, k: int) -> str:
    return f"{TILE_KEY}{pos}:{k}"


def generate_tiled(model, samples: Sequence[Sample], cfg, tiling: Tiling, *, batch_size: int,
                   on_image: Callable[[int, Sample, np.ndarray], None], loader=None,
                   on_batch: Callable[[int, int], None] | None = None, compile: bool = False) -> None:
    """Restore the first image of every sample tile by tile (image-only generation).

    ``on_image(i, sample, pixels)``: sample ``i`` of ``samples`` is finished (``[H, W, 3]`` uint8 at
    its input's size). ``on_batch(tiles, images)``: after each batch, the tiles it held and the
    images it finished. ``loader(path)`` reads an input image (default: the file, as RGB)."""
    from .generate import build_items, generate_batch, image_only_for, model_device
    from .query import check_query

    check_tile_samples(samples)
    check_query(model, samples)
    load = loader or load_rgb
    dev, dtype = model_device(model), model.adapter_dtype
    size = model.encoder.image_size
    canvases: dict[int, Canvas] = {}

    def tiles() -> Iterator[tuple[int, int, Sample, np.ndarray]]:
        for pos, s in enumerate(samples):
            img = np.asarray(load(s.images[0]).convert("RGB"))
            plan = plan_tiles(img.shape[0], img.shape[1], tiling)
            canvases[pos] = Canvas(plan)
            for k in range(plan.count):
                yield pos, k, s, cut_tile(img, plan, k)
            del img

    stream = tiles()
    while True:
        chunk = [t for _, t in zip(range(batch_size), stream)]
        if not chunk:
            break
        table = {}
        tile_samples = []
        for pos, k, s, t in chunk:
            key = _tile_key(pos, k)
            table[key] = t
            tile_samples.append(dataclasses.replace(s, images=(key, *s.images[1:])))
        from PIL import Image

        def tile_loader(path: str, _table=table):
            if path.startswith(TILE_KEY):
                return Image.fromarray(_table[path])
            return load(path)

        mode = "image"
        items, _ = build_items(model, tile_samples, mode, tile_loader, "stretch", cfg.query)
        batch = collate(items, pad_id=model.builder.pad_id, padding_side="left").to(dev, dtype)
        keys = [s.index * 1_000_003 + k for (_, k, s, _) in chunk]  # each tile samples from its own generator
        outs = generate_batch(model, batch, cfg, image_only=[image_only_for(s, mode) for s in tile_samples],
                              keys=keys, compile=compile)
        finished = 0
        for (pos, k, s, _), o in zip(chunk, outs):
            if not o.images:
                raise ConfigError(f"sample {s.index}: the model produced no image for tile {k}")
            canvas = canvases[pos]
            canvas.add(k, _at_tile_size(o.images[0], tiling.size, size))
            if canvas.done:
                on_image(pos, s, canvas.finish())
                del canvases[pos]
                finished += 1
        if on_batch is not None:
            on_batch(len(chunk), finished)


def _at_tile_size(image: torch.Tensor, tile: int, model_size: int) -> np.ndarray:
    """A generated ``[3, S, S]`` tile in [0, 1] → ``[tile, tile, 3]`` float32 (bicubic, antialiased
    when the tile is not at the model's size)."""
    x = image.detach().float().clamp(0, 1)
    if tile != x.shape[-1]:
        x = torch.nn.functional.interpolate(x[None], size=(tile, tile), mode="bicubic", antialias=True,
                                            align_corners=False)[0].clamp(0, 1)
    return x.permute(1, 2, 0).cpu().numpy()


def tile_count(paths: Sequence[str], tiling: Tiling) -> int:
    """How many tiles the images at ``paths`` make (sizes read from their headers)."""
    from ..image.io import oriented_size

    total = 0
    for p in paths:
        w, h = oriented_size(p)
        total += plan_tiles(h, w, tiling).count
    return total


class TileProgress:
    """A progress bar over tiles with the count of finished images beside it."""

    def __init__(self, label: str, tiles: int, images: int, show: bool = True):
        from ..util.progress import progress_bar

        self.images, self.done = images, 0
        self.bar = progress_bar(f"{label} (tiles)", tiles, show=show, info=True)

    def __enter__(self) -> "TileProgress":
        self.bar.start()
        self.bar.update(0, info=f"images 0/{self.images}")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def advance(self, tiles: int, images: int) -> None:
        self.done += images
        self.bar.advance(tiles)
        if self.bar.bar is not None:
            self.bar.bar.update(self.bar.task, info=f"images {self.done}/{self.images}")
