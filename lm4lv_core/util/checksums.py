"""Size and SHA-256 of every file in a folder, recorded in ``checksums.json`` and verified later.

Training checkpoints carry one (the last file written before the folder is published), so a
resume can tell an intact checkpoint from one that was truncated, altered or left incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .fsutil import is_internal, write_json_atomic

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_internal(d))
        for name in sorted(filenames):
            if not is_internal(name) and not (dirpath == str(folder) and name == CHECKSUMS_FILE):
                out.append(Path(dirpath) / name)
    return out


def record(folder: str | os.PathLike) -> dict[str, Any]:
    """Write ``folder/checksums.json`` listing every file below ``folder`` (size, sha256)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(folder)}
    data = {"algorithm": "sha256", "files": files}
    write_json_atomic(folder / CHECKSUMS_FILE, data)
    return data


def verify(folder: str | os.PathLike, full: bool = True) -> str | None:
    """``None`` when every file listed in ``checksums.json`` is present with its size (and, when
    ``full``, its checksum); otherwise a short description of the first problem found."""
    folder = Path(folder)
    try:
        data = json.loads((folder / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        return f"{CHECKSUMS_FILE} is missing (incomplete)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS_FILE} is unreadable ({e})"
    for rel, want in files.items():
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("size"):
            return f"{rel} has {size} bytes, expected {want.get('size')}"
    if full:
        for rel, want in files.items():
            try:
                digest = sha256_file(folder / rel)
            except OSError as e:
                return f"{rel} is unreadable ({e.strerror})"
            if digest != want.get("sha256"):
                return f"{rel} does not match its checksum"
    return None
