"""Tiles: restoring an image at its own resolution with a model of a fixed square size.

An image of any size (odd ones included) is cut at native resolution into square tiles of side
``size`` that overlap by ``overlap`` pixels; the image is reflect-padded by ``overlap`` on the top
and left, and as far as the last tile needs on the bottom and right, so that every image pixel lies
where tiles are fully weighted or where their smooth ramps meet. Each restored tile is weighted by a
separable raised-cosine window (1 in the middle, ramps of length ``overlap`` at the edges; two ramps
that meet sum to 1) and accumulated into a canvas; the canvas divides by the summed weights and is
cropped back to the input's size.

The canvas keeps only a band of float rows (a tile row): tiles arrive in raster order, and the rows
above the current tile row are final, so they are written into the ``uint8`` output as soon as the
next tile row starts. Memory is one ``uint8`` output image plus a band, whatever the image's size.

Pure numpy / torch code: the model side lives in :mod:`lm4lv_core.model.tiled`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

from ..config import parse_tile  # noqa: F401  (the --tile value, parsed with the generation options)
from ..defaults import TILE_AUTO as AUTO


# ---------------------------------------------------------------------------- options


def family_patch(num_tokens: int, image_size: int) -> int:
    """The side of the patch one token covers in a family's square image: ``image_size`` over the
    token grid's side (a leading class token is not counted); the whole image when the tokens form
    no square grid."""
    for n in (num_tokens, num_tokens - 1):
        g = math.isqrt(max(n, 0))
        if g > 0 and g * g == n and image_size % g == 0:
            return image_size // g
    return image_size


@dataclass(frozen=True)
class Tiling:
    """Resolved tile options: square tiles of ``size`` px overlapping by ``overlap`` px."""

    size: int
    overlap: int

    @property
    def stride(self) -> int:
        return self.size - self.overlap


def resolve_tiling(tile, overlap: int | None, image_size: int, patch: int) -> Tiling | None:
    """``--tile`` / ``--tile-overlap`` against a family of square ``image_size`` and ``patch``:
    ``auto`` is the family's size; the default overlap is a quarter of the tile, rounded down to
    whole patches. A tile smaller than the patch, or an overlap that is not smaller than the tile,
    is a one-line ``ConfigError``. ``None`` when tiling is off."""
    tile = parse_tile(tile)
    if tile is None:
        if overlap is not None:
            raise ConfigError("--tile-overlap needs --tile N|auto")
        return None
    size = image_size if tile == AUTO else int(tile)
    if size < patch:
        raise ConfigError(f"--tile {size} is smaller than the vision family's patch ({patch} px): a tile must "
                          f"hold at least one patch (--tile auto = {image_size})")
    if overlap is None:
        overlap = (size // 4) // patch * patch
    if overlap < 0:
        raise ConfigError(f"--tile-overlap must be >= 0, got {overlap}")
    if overlap >= size:
        raise ConfigError(f"--tile-overlap {overlap} must be smaller than the tile ({size} px)")
    return Tiling(size, overlap)


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one ``height`` x ``width`` image lie: tile ``k`` covers padded rows
    ``ys[k // len(xs)] ...+ size`` and columns ``xs[k % len(xs)] ...+ size``; image pixel ``(r, c)``
    is padded pixel ``(r + pad, c + pad)``. Tiles are numbered in raster order."""

    height: int
    width: int
    size: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def pad(self) -> int:
        return self.overlap

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origin(self, k: int) -> tuple[int, int]:
        """Padded (row, column) of tile ``k``'s top-left corner."""
        return self.ys[k // len(self.xs)], self.xs[k % len(self.xs)]


def _starts(length: int, size: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis of ``length`` image pixels (padded by ``overlap`` before)."""
    stride = size - overlap
    n = 1 if length + 2 * overlap <= size else math.ceil((length + 2 * overlap - size) / stride) + 1
    return tuple(k * stride for k in range(n))


def plan_tiles(height: int, width: int, tiling: Tiling) -> TilePlan:
    """The tiles of an image of ``height`` x ``width`` pixels (any size, 1 px included)."""
    if height < 1 or width < 1:
        raise ValueError(f"an image of {width}x{height} pixels has no tiles")
    return TilePlan(height, width, tiling.size, tiling.overlap, _starts(height, tiling.size, tiling.overlap),
                    _starts(width, tiling.size, tiling.overlap))


def count_tiles(height: int, width: int, tiling: Tiling) -> int:
    return plan_tiles(height, width, tiling).count


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into ``[0, n)`` without repeating the edge pixel (numpy's ``reflect``),
    for any distance beyond the edges."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx < n, idx, period - idx)


def cut_tile(image: np.ndarray, plan: TilePlan, k: int) -> np.ndarray:
    """Tile ``k`` of an ``[H, W, C]`` image (any dtype) as ``[size, size, C]``, its parts outside the
    image reflected from inside (no padded copy of the image is made)."""
    y, x = plan.origin(k)
    rows = _reflect(np.arange(y, y + plan.size) - plan.pad, plan.height)
    cols = _reflect(np.arange(x, x + plan.size) - plan.pad, plan.width)
    return image[np.ix_(rows, cols)]


def window(size: int, overlap: int) -> np.ndarray:
    """The ``[size, size]`` blending weights of a tile: the outer product of a 1-D window that is 1
    in the middle and rises as ``sin²`` over ``overlap`` pixels at each end (never exactly 0, and two
    ramps that meet sum to 1). ``overlap`` 0: all ones."""
    w = np.ones(size, dtype=np.float64)
    if overlap > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        n = min(overlap, size)
        w[:n] = np.minimum(w[:n], ramp[:n])
        w[size - n:] = np.minimum(w[size - n:], ramp[:n][::-1])
    return np.outer(w, w).astype(np.float32)


# ---------------------------------------------------------------------------- canvas
class Canvas:
    """Accumulates the restored tiles of one image (added in raster order, as ``[size, size, 3]``
    float arrays in [0, 1]) into its ``[height, width, 3]`` ``uint8`` result.

    ``blend=False`` weights every tile by ones over its whole area (plain averaging of overlaps;
    with overlap 0 the tiles simply abut), for comparison."""

    def __init__(self, plan: TilePlan, blend: bool = True):
        self.plan = plan
        self.weight = window(plan.size, plan.overlap if blend else 0)
        self.out = np.zeros((plan.height, plan.width, 3), dtype=np.uint8)
        self.padded_width = plan.xs[-1] + plan.size
        self.band_top = 0          # padded row of the band's first row
        self.band = np.zeros((0, self.padded_width, 3), dtype=np.float32)
        self.band_w = np.zeros((0, self.padded_width), dtype=np.float32)
        self.added = 0

    def add(self, k: int, tile: np.ndarray) -> None:
        """Add restored tile ``k`` (tiles must come in order ``0, 1, ...``)."""
        if k != self.added:
            raise ValueError(f"tile {k} added out of order (expected {self.added})")
        y, x = self.plan.origin(k)
        s = self.plan.size
        if tile.shape[:2] != (s, s):
            raise ValueError(f"tile {k} is {tile.shape[1]}x{tile.shape[0]}, expected {s}x{s}")
        self._flush(y)  # every row above this tile's first one is final
        need = y + s - self.band_top
        if need > self.band.shape[0]:
            grow = need - self.band.shape[0]
            self.band = np.concatenate([self.band, np.zeros((grow, self.padded_width, 3), np.float32)])
            self.band_w = np.concatenate([self.band_w, np.zeros((grow, self.padded_width), np.float32)])
        r = y - self.band_top
        self.band[r:r + s, x:x + s] += tile.astype(np.float32, copy=False) * self.weight[..., None]
        self.band_w[r:r + s, x:x + s] += self.weight
        self.added += 1

    def _flush(self, upto: int) -> None:
        """Write the band's rows above padded row ``upto`` into the output and drop them."""
        n = min(upto - self.band_top, self.band.shape[0])
        if n <= 0:
            return
        pad, p = self.plan.pad, self.plan
        lo, hi = max(self.band_top, pad), min(self.band_top + n, pad + p.height)  # padded rows in the image
        if hi > lo:
            rows = slice(lo - self.band_top, hi - self.band_top)
            vals = self.band[rows, pad:pad + p.width] / np.maximum(self.band_w[rows, pad:pad + p.width, None], 1e-12)
            self.out[lo - pad:hi - pad] = np.clip(np.rint(vals * 255.0), 0, 255).astype(np.uint8)
        self.band, self.band_w = self.band[n:], self.band_w[n:]
        self.band_top += n

    @property
    def done(self) -> bool:
        return self.added == self.plan.count

    def finish(self) -> np.ndarray:
        """The restored image ``[height, width, 3]`` ``uint8`` (all tiles must have been added)."""
        if not self.done:
            raise ValueError(f"{self.plan.count - self.added} of {self.plan.count} tiles were never added")
        self._flush(self.band_top + self.band.shape[0])
        return self.out


def restore_tiled(sources, tiling: Tiling, restore, *, batch: int, on_image, on_batch=None,
                  blend: bool = True) -> None:
    """Restore many images tile by tile, the tiles of several images sharing each batch.

    ``sources``: an iterable of ``(key, load)``, ``load()`` giving an ``[H, W, 3]`` ``uint8``
    image (read only when its tiles are needed); ``restore``: ``[n, size, size, 3]`` ``uint8``
    tiles → ``[n, size, size, 3]`` floats in [0, 1]. ``on_image(key, pixels)`` receives each image
    as soon as its last tile is in; ``on_batch(tiles, images)`` follows each batch."""
    canvases: dict[int, tuple[object, Canvas]] = {}

    def stream():
        for pos, (key, load) in enumerate(sources):
            img = load()
            plan = plan_tiles(img.shape[0], img.shape[1], tiling)
            canvases[pos] = (key, Canvas(plan, blend))
            for k in range(plan.count):
                yield pos, k, cut_tile(img, plan, k)
            del img

    tiles = stream()
    while True:
        chunk = [t for _, t in zip(range(batch), tiles)]
        if not chunk:
            return
        finished = 0
        for (pos, k, _), out in zip(chunk, restore(np.stack([t for _, _, t in chunk]))):
            key, canvas = canvases[pos]
            canvas.add(k, np.asarray(out))
            if canvas.done:
                on_image(key, canvas.finish())
                del canvases[pos]
                finished += 1
        if on_batch is not None:
            on_batch(len(chunk), finished)


def tile_image(image: np.ndarray, tiling: Tiling, restore, *, batch: int = 16, blend: bool = True) -> np.ndarray:
    """The tiled restoration of one ``[H, W, 3]`` ``uint8`` image by ``restore`` (see
    :func:`restore_tiled`)."""
    result = []
    restore_tiled([(0, lambda: image)], tiling, restore, batch=batch, blend=blend,
                  on_image=lambda _, px: result.append(px))
    return result[0]


# ---------------------------------------------------------------------------- seam score
def tile_edges(plan: TilePlan) -> tuple[list[int], list[int]]:
    """Image rows and columns where a tile begins or ends (a pixel boundary ``b`` lies between
    pixels ``b - 1`` and ``b``), strictly inside the image."""
    def edges(starts, length):
        out = set()
        for s in starts:
            for b in (s - plan.pad, s + plan.size - plan.pad):
                if 0 < b < length:
                    out.add(b)
        return sorted(out)
    return edges(plan.ys, plan.height), edges(plan.xs, plan.width)


def patch_edges(plan: TilePlan, patch: int) -> tuple[list[int], list[int]]:
    """Image rows and columns on the patch grids of the tiles (each tile's model sees its own patch
    grid), at least 2 px from every tile edge."""
    te_r, te_c = tile_edges(plan)

    def edges(starts, length, tile_e):
        out = set()
        for s in starts:
            for j in range(1, plan.size // patch):
                b = s - plan.pad + j * patch
                if 0 < b < length and all(abs(b - e) >= 2 for e in tile_e):
                    out.add(b)
        return sorted(out)
    return edges(plan.ys, plan.height, te_r), edges(plan.xs, plan.width, te_c)


def _mean_step(img: np.ndarray, rows: list[int], cols: list[int]) -> float:
    """Mean absolute difference across the given row and column boundaries of an ``[H, W, C]`` image."""
    a = img.astype(np.float64)
    parts = [np.abs(a[b] - a[b - 1]).ravel() for b in rows] + [np.abs(a[:, b] - a[:, b - 1]).ravel() for b in cols]
    return float(np.concatenate(parts).mean()) if parts else float("nan")


def seam_score(img: np.ndarray, plan: TilePlan, patch: int) -> float:
    """Mean absolute gradient across tile boundaries ÷ mean absolute gradient across the family's
    patch boundaries elsewhere in ``img`` (the restored image of ``plan``): 1.0 means the tile
    boundaries are no more visible than the model's own patch grid. NaN when the image has no
    tile boundary or no patch boundary away from them."""
    seams = _mean_step(img, *tile_edges(plan))
    grid = _mean_step(img, *patch_edges(plan, patch))
    return seams / grid if grid > 0 else float("nan")
