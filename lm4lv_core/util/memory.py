"""Memory a job can count on, allocations checked before they are tried, and errors about one
image turned into one line naming the stage and the file (never a ``MemoryError`` traceback)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from ..errors import LM4LVError


def available_bytes() -> int | None:
    """Memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``, else the
    physical memory); ``None`` when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_allocation(need: int, what: str) -> None:
    """Refuse at once (one ``LM4LVError`` naming ``what``) an allocation estimated at ``need``
    bytes that exceeds the memory available now."""
    have = available_bytes()
    if have is not None and need > have:
        raise LM4LVError(f"{what} needs about {gib(need)} of memory, more than the {gib(have)} "
                         "available on this machine")


# bytes per pixel a decoded 8-bit RGB image takes in lm4lv's pipelines (decoded copy, RGB conversion,
# float working copies of the metrics / degradations)
DECODE_BYTES_PER_PIXEL = 3 * 4


_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("lm4lv_stage", default="")


def check_image_size(path: str | os.PathLike, width: int, height: int,
                     bytes_per_pixel: int = DECODE_BYTES_PER_PIXEL) -> None:
    """Before decoding: refuse an image whose decoded size (from its header) cannot fit in memory
    (the message names the stage of :func:`named_errors` around it, the file and the size)."""
    stage = _STAGE.get()
    check_allocation(int(width) * int(height) * bytes_per_pixel,
                     f"{stage + ': ' if stage else ''}{path}: decoding this {width}x{height} image")


@contextlib.contextmanager
def named_errors(stage: str, path: str | os.PathLike) -> Iterator[None]:
    """Inside: an ``LM4LVError`` that does not name ``path`` gets it as a prefix, and a
    ``MemoryError`` becomes one ``LM4LVError`` naming ``stage`` and ``path``."""
    p = str(path)
    token = _STAGE.set(stage)
    try:
        yield
    except MemoryError:
        raise LM4LVError(f"{stage}: {p}: out of memory while processing this image") from None
    except LM4LVError as e:
        if p in str(e):
            raise
        raise LM4LVError(f"{p}: {e}") from None
    finally:
        _STAGE.reset(token)
