"""Atomic file writes, recognisable temporary names, and write errors as one-line messages.

Every temporary file or folder lm4lv writes starts with :data:`TEMP_PREFIX` and never ends in the
final file's extension, so no output glob (``*.png``, ``*.jsonl``, ``step-*``) matches it. A process
killed mid-write leaves such a name behind; the next run in that folder (holding the folder's run
lock, see :mod:`lm4lv_core.util.runlock`) removes them with :func:`remove_stale_temps`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import OutputError

TEMP_PREFIX = ".lm4lv-tmp-"
LOCK_NAME = ".lm4lv-lock"
# errors that mean "this output cannot be written here", reported as one line
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


_NODE_ENTRY = re.compile(rf"{re.escape(LOCK_NAME)}\.node\d+|.+\.node\d+\.log")


def is_internal(name: str) -> bool:
    """Names of lm4lv's own bookkeeping entries (temporary files/folders, the run lock, and a
    multi-node run's per-node locks and logs, which another node may create first)."""
    return name.startswith(TEMP_PREFIX) or name == LOCK_NAME or bool(_NODE_ENTRY.fullmatch(name))


def user_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` other than lm4lv's temporary files, locks and per-node logs."""
    return [p for p in Path(folder).iterdir() if not is_internal(p.name)]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary name is ``.lm4lv-tmp-<name>.<random>.tmp`` (``suffix`` is accepted for
    compatibility and ignored: a temporary name never ends in the final extension). On any
    exception the temporary file is removed and ``path`` is left untouched; a full disk or an
    unwritable folder raises :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


def temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty temporary folder ``parent/.lm4lv-tmp-<name>.<random>``."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}.", dir=parent))


def remove_stale_temps(root: str | os.PathLike, prefix: str = TEMP_PREFIX, skip: Iterable[str] = ()) -> list[Path]:
    """Delete temporary files/folders (names starting with ``prefix``) anywhere under ``root``,
    except below the folders named in ``skip``.

    Only safe while no other process writes there: call it holding the folder's run lock.
    Returns what was removed.
    """
    skip = set(skip)
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(prefix):
                p = Path(e.path)
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
            elif e.is_dir(follow_symlinks=False) and e.name not in skip:
                stack.append(Path(e.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class JsonStream:
    """A JSON list whose items come from an iterable and are written one at a time by
    :func:`write_json_atomic` (a list of 100 000 samples or rows is never held as text)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items


def _json_chunks(obj: Any, indent: int | None, level: int) -> Iterator[str]:
    """``json.dumps(obj, indent=indent)`` in pieces, with :class:`JsonStream` lists streamed."""
    pad = "" if indent is None else "\n" + " " * (indent * level)
    inner = "" if indent is None else "\n" + " " * (indent * (level + 1))
    sep = ", " if indent is None else ","
    if isinstance(obj, JsonStream):
        first = True
        for item in obj.items:
            yield ("[" if first else sep) + inner
            yield from _json_chunks(item, indent, level + 1)
            first = False
        yield "[]" if first else pad + "]"
    elif isinstance(obj, dict) and any(_has_stream(v) for v in obj.values()):
        yield "{"
        for k, (key, value) in enumerate(obj.items()):
            yield (sep if k else "") + inner + json.dumps(str(key), ensure_ascii=False) + ": "
            yield from _json_chunks(value, indent, level + 1)
        yield pad + "}"
    elif isinstance(obj, (list, tuple)) and any(_has_stream(v) for v in obj):
        yield "["
        for k, value in enumerate(obj):
            yield (sep if k else "") + inner
            yield from _json_chunks(value, indent, level + 1)
        yield pad + "]"
    else:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
        yield text.replace("\n", pad) if indent is not None and level else text


def _has_stream(obj: Any) -> bool:
    if isinstance(obj, JsonStream):
        return True
    if isinstance(obj, dict):
        return any(_has_stream(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_stream(v) for v in obj)
    return False


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as JSON, atomically; :class:`JsonStream` values inside it are written item by item."""
    if not _has_stream(obj):
        write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for chunk in _json_chunks(obj, indent, 0):
            f.write(chunk)
        f.write("\n")


def write_csv_atomic(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """A CSV file with a header and one line per row, written row by row, atomically."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def foreign_entries(folder: str | os.PathLike, names: Iterable[str],
                    patterns: dict[str, str] | None = None) -> list[Path]:
    """Entries inside the subfolders ``folder/<name>`` that ``patterns`` (name → regular expression
    of the entries lm4lv writes there) does not match, lm4lv's temporary files aside: files a
    user put among lm4lv's own, which :func:`remove_entries` must not delete."""
    out: list[Path] = []
    for name in names:
        p = Path(folder) / name
        regex = (patterns or {}).get(name)
        if regex is None or not p.is_dir() or p.is_symlink():
            continue
        rx = re.compile(regex)
        out += sorted(e for e in p.iterdir() if not is_internal(e.name) and not rx.fullmatch(e.name))
    return out


def remove_entries(folder: str | os.PathLike, names: Iterable[str],
                   patterns: dict[str, str] | None = None) -> list[Path]:
    """Remove the entries ``folder/<name>`` that exist (folders with their content, files; a
    symbolic link is removed, not what it points to); other entries are left alone. Returns
    what was removed.

    ``patterns``: for the subfolders named there, only the entries matching the regular
    expression (what lm4lv writes there) are removed, and the subfolder when it is left empty;
    an entry that does not match refuses the whole removal beforehand (a ``ConfigError``
    naming it), so nothing is deleted."""
    from ..errors import ConfigError

    names = list(names)
    foreign = foreign_entries(folder, names, patterns)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ConfigError(f"--overwrite: {foreign[0]}{more} was not written by lm4lv; it would have to be "
                          "removed: move it elsewhere first")
    removed = []
    for name in names:
        p = Path(folder) / name
        if patterns and name in patterns and p.is_dir() and not p.is_symlink():
            for e in list(p.iterdir()):
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e)
                else:
                    e.unlink()
            p.rmdir()
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.is_symlink() or p.exists():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------- write errors
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def write_failure(exc: BaseException) -> str | None:
    """The cause (e.g. ``No space left on device``) when ``exc`` or an exception it wraps is a
    failed write to a full, read-only or forbidden place; ``None`` for anything else.

    Understands ``OSError`` and libraries that only keep the OS message in their text
    (safetensors: ``... No space left on device (os error 28)``).
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutputError):
            return e.cause
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.strerror or os.strerror(e.errno)
        recorded = getattr(e, "write_error", None)
        if isinstance(recorded, OSError) and recorded.errno in WRITE_ERRNOS:
            return recorded.strerror or os.strerror(recorded.errno)
        m = _OS_ERROR_RE.search(str(e))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return os.strerror(int(m.group(1)))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn a failed write inside the block into ``OutputError("cannot write PATH: CAUSE")`` (an
    ``OutputError`` from an inner block is renamed to this, the outer, path)."""
    try:
        yield
    except Exception as e:
        cause = write_failure(e)
        if cause is None:
            raise
        raise OutputError(f"cannot write {what or path}: {cause}", cause) from None


class _RecordingWriter(io.RawIOBase):
    """A file wrapper that remembers the ``OSError`` of a failed write: ``torch.save`` replaces
    it by an uninformative ``RuntimeError``."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.write_error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.write_error = e
            raise

    def flush(self) -> None:
        if not self.f.closed:
            self.f.flush()


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` whose write failures keep their cause (see :func:`write_failure`)."""
    import torch

    with writing(path), open(path, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError as e:
            if w.write_error is not None:
                raise w.write_error from e
            raise
