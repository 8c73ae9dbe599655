"""Reading and writing images (8-bit RGB in, PNG out, atomically) and the size policies that bring
them to the model's square size and restored images back to their input's size."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from ..defaults import RESIZE_MODES
from ..errors import ConfigError, LM4LVError
from ..util.fsutil import atomic_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open(path)``; a missing or unreadable file (also while the block reads it) raises a
    one-line ``LM4LVError`` naming it."""
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        raise LM4LVError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LM4LVError(f"{path}: cannot read image ({e})") from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any supported image as 8-bit RGB.

    EXIF orientation is applied; grayscale, RGBA (composited on black is *not* done: alpha is
    dropped), palette and 16-bit images are converted to 8-bit RGB.
    """
    from ..util.memory import check_image_size

    with _opened(Path(path)) as im:
        check_image_size(path, *im.size)  # from the header, before decoding
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr, mode="L")
        if im.mode == "P":
            im = im.convert("RGBA")
        return im.convert("RGB")


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike) -> None:
    """Write a PNG atomically (temp file + rename). Arrays must be HxWx3 uint8."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


JPEG_EXTS = (".jpg", ".jpeg")  # lossy inputs whose restored images keep their format (the rest: PNG)
JPEG_QUALITY = 95


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Write an RGB image atomically in the format its suffix names: JPEG (quality 95) for
    ``.jpg`` / ``.jpeg``, PNG for ``.png``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*JPEG_EXTS, ".png"):
        raise ValueError(f"save_image writes .png, .jpg or .jpeg files, not {path.name}")
    with atomic_path(path) as tmp:
        if suffix in JPEG_EXTS:
            image.convert("RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)
        else:
            image.save(tmp, format="PNG")


def list_relative(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of all supported images under ``root`` (recursive; hidden files and
    symbolic links to folders left out), sorted. Strings, not ``Path`` objects: a folder of 100 000
    images is listed in a few MiB."""
    out: list[str] = []
    stack = [("", os.fspath(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((f"{prefix}{e.name}/", e.path))
                elif (not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS
                      and e.is_file()):
                    out.append(prefix + e.name)
            except OSError:
                continue
    out.sort()
    return out


def list_images(root: str | os.PathLike) -> list[Path]:
    """All supported images under ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    return [root / r for r in list_relative(root)]


def require_images(root: str | os.PathLike, what: str = "") -> list[Path]:
    """``list_images(root)``, or one clear error when the folder holds none."""
    files = list_images(root)
    if not files:
        exts = "/".join(e.lstrip(".") for e in IMAGE_EXTS)
        raise LM4LVError(f"{what + ' ' if what else ''}{root}: no images found (looked for {exts}, recursively)")
    return files


def _by_key(root: str | os.PathLike, rels: list[str]) -> dict[str, str]:
    """Relative path without extension → relative path; two files differing only by extension
    are an error."""
    out: dict[str, str] = {}
    for r in rels:
        k = os.path.splitext(r)[0]
        if k in out:
            raise LM4LVError(f"{root}: {out[k]} and {r} have the same name apart from the extension; keep one")
        out[k] = r
    return out


def pair_relative(root_a: str | os.PathLike, root_b: str | os.PathLike
                  ) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """Pair the images of two folders (recursive): ``(key, rel_a, rel_b)`` relative POSIX paths
    sorted by key (``rel_b`` is the same string object as ``rel_a`` when they are equal), and the
    unpaired relative paths of each side.

    Files pair by relative path without extension (``x/a.png`` with ``x/a.jpg``, key ``x/a``); files
    left over then pair by bare file stem when that stem is unique on both sides (``a.png`` with
    ``out/a.png``). Two files of one folder that differ only by extension are an error.
    """
    for r in (root_a, root_b):
        if not Path(r).is_dir():
            raise LM4LVError(f"{r}: not a folder")
    a, b = _by_key(root_a, list_relative(root_a)), _by_key(root_b, list_relative(root_b))
    pairs = []
    for k in sorted(set(a) & set(b)):
        ra, rb = a.pop(k), b.pop(k)
        pairs.append((k, ra, ra if rb == ra else rb))
    stem = lambda k: k.rsplit("/", 1)[-1]  # noqa: E731
    stems_a: dict[str, list[str]] = {}
    stems_b: dict[str, list[str]] = {}
    for k in a:
        stems_a.setdefault(stem(k), []).append(k)
    for k in b:
        stems_b.setdefault(stem(k), []).append(k)
    for s in sorted(set(stems_a) & set(stems_b)):
        if len(stems_a[s]) == 1 and len(stems_b[s]) == 1:
            ka, kb = stems_a[s][0], stems_b[s][0]
            pairs.append((ka, a.pop(ka), b.pop(kb)))
    pairs.sort(key=lambda t: t[0])
    return pairs, sorted(a.values()), sorted(b.values())


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, antialiased) so that the shorter side is ``size`` and the aspect ratio
    is kept (the longer side rounded, never below ``size``)."""
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """The ``crop`` size policy: resize the shorter side to ``size`` (bicubic, antialiased), then
    centre-crop to ``size`` x ``size``. ``size`` 0, or an image already that size, is unchanged."""
    if size <= 0 or img.size == (size, size):
        return img
    img = resize_shorter(img, size)
    nw, nh = img.size
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------- size policy
RESIZE_POLICIES = {
    "stretch": "resized to SIZE x SIZE whatever its aspect ratio (bicubic, antialiased), as the reference",
    "crop": "shorter side resized to SIZE (bicubic, antialiased), then centre-cropped to SIZE x SIZE",
}


def check_resize(mode: str) -> str:
    """``mode`` if it is a size policy, else a one-line ``ConfigError``."""
    if mode not in RESIZE_MODES:
        raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return mode


def to_square(img: Image.Image, size: int, resize: str = "stretch") -> Image.Image:
    """An image at the model's ``size`` x ``size`` under a size policy (:data:`RESIZE_POLICIES`):
    ``stretch`` resizes both sides to ``size`` (bicubic, antialiased), ``crop`` is
    :func:`fit_square`. ``size`` 0, or an image already that size, is unchanged."""
    check_resize(resize)
    if resize == "crop":
        return fit_square(img, size)
    if size <= 0 or img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC)


def restored_size(input_size: tuple[int, int], resize: str) -> tuple[int, int]:
    """(width, height) a restored image is written at for an input of ``input_size``: the input's
    own size under ``stretch``; under ``crop``, the footprint of the centre square the model saw
    (side ``min(width, height)``), since the model never saw the rest."""
    w, h = input_size
    if check_resize(resize) == "crop":
        return (min(w, h), min(w, h))
    return (w, h)


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` at (width, height) ``size`` (bicubic, antialiased); unchanged when already that size."""
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.Resampling.BICUBIC)


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as :func:`load_rgb` returns it (EXIF orientation applied),
    read from its header without decoding the pixels."""
    with _opened(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
