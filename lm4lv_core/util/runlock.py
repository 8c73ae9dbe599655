"""One run per output folder: an advisory lock file held for the whole command.

``train``, ``ft-mae`` and ``generate`` lock ``OUT/.lm4lv-lock``; ``make-data`` locks
``PARENT/.lm4lv-lock-NAME`` beside its dataset folder (it publishes the folder with one rename).
The lock is an ``fcntl.flock`` on that file, so the kernel releases it when the holding process
dies, however it dies: a killed run never leaves the folder stuck. The file holds the holder's
pid, host and command, which a refused second run names. On filesystems without ``flock`` the
file's pid is checked for liveness instead (same host only).

Holding the lock, a run may remove the temporary files that killed runs left in its folder
(:func:`lm4lv_core.util.fsutil.remove_stale_temps`): no other lm4lv process writes there.

The nodes of one multi-node run share its folder: node 0 takes the folder's lock (so a
different run is refused as before), node R > 0 locks ``.lm4lv-lock.nodeR`` (a second command
started as the same node is refused) and leaves temporary files alone; node 0 leaves the job
folder's alone, where the other nodes write their job files meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import LM4LVError, OutputError
from .fsutil import LOCK_NAME, TEMP_PREFIX, remove_stale_temps, write_failure

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderBusy(LM4LVError):
    """Another live lm4lv run holds the folder."""


def lock_path(folder: Path, beside: bool = False, node: int = 0) -> Path:
    folder = Path(folder).absolute()
    if beside:
        return folder.parent / f"{LOCK_NAME}-{folder.name}"
    return folder / (f"{LOCK_NAME}.node{node}" if node else LOCK_NAME)


@contextlib.contextmanager
def hold(folder: str | os.PathLike, command: str, beside: bool = False, node: int | None = None,
         shared: Iterable[str] = ()) -> Iterator[Path]:
    """Lock ``folder`` for ``command`` (creating it unless ``beside``), remove temporary files
    that killed runs left there, run the block, then release the lock (folders created here that
    stayed empty are removed again).

    ``node``: this node of a multi-node run (``None``: a single-node run); ``shared``: subfolders
    where the other nodes write meanwhile (node 0 removes no temporary files there).
    Raises :class:`FolderBusy` when a live run holds it and :class:`OutputError` when the
    folder cannot be written (checked here, before any work).
    """
    folder = Path(folder).absolute()
    path = lock_path(folder, beside, node or 0)
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    try:
        (folder.parent if beside else folder).mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, folder, command if node is None else f"{command} (node {node})")
    except BaseException as e:
        _remove_empty(created)
        cause = write_failure(e) if isinstance(e, OSError) else None
        if cause is None:
            raise
        raise OutputError(f"--out {folder}: cannot write there ({cause})", cause) from None
    try:
        # other nodes of this run may be writing here already: only node 0 cleans, around them
        removed = remove_stale_temps(folder, skip=shared if node is not None else ()) if not node else []
        if beside:
            removed += remove_stale_temps(folder.parent, prefix=f"{TEMP_PREFIX}{folder.name}.")
        if removed:
            print(f"removed {len(removed)} temporary file(s) left by an interrupted run in {folder}",
                  file=sys.stderr, flush=True)
        yield folder
    finally:
        _release(fd, path)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()  # only when still empty


def holder(path: Path) -> dict:
    """What the lock file says about its holder (empty when unreadable)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(folder: Path, path: Path) -> FolderBusy:
    info = holder(path)
    if not info:  # the holder may not have written its details yet
        time.sleep(0.2)
        info = holder(path)
    who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    since = f", since {info['started']}" if info.get("started") else ""
    return FolderBusy(f"--out {folder}: another lm4lv {info.get('command', '')} run ({who}{since}) is using "
                      "this folder; wait for it to end or choose another folder")


def _info(command: str) -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode()


def _acquire(path: Path, folder: Path, command: str) -> int:
    import fcntl

    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, path) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            _check_pid(path, folder)  # no flock on this filesystem: the recorded pid must be dead
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and flock: retry
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _info(command))
        except OSError:
            os.close(fd)
            raise
        return fd
    raise LM4LVError(f"--out {folder}: could not lock {path}")


def _check_pid(path: Path, folder: Path) -> None:
    info = holder(path)
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    if host != socket.gethostname():
        raise FolderBusy(f"--out {folder}: {path} names a run on host {host} (pid {pid}) and this "
                         "filesystem has no locks to tell whether it still runs; delete the file if it does not")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    raise _busy(folder, path)


def _release(fd: int, path: Path) -> None:
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)  # still holding the lock: nobody else can own this file now
    except OSError:
        pass
    finally:
        os.close(fd)
