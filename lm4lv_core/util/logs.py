"""The console and the log file of a job.

lm4lv's own lines, progress bars and errors go to the user's console; everything else a job
prints (third-party warnings, DeepSpeed / accelerate / launcher INFO lines, C-level messages,
compiler output) goes to the job's log file (``train.log`` in a run folder), and also to the
console with ``verbose``.

* In-process jobs: :func:`capture` points file descriptors 1 and 2 (and ``sys.stdout`` /
  ``sys.stderr``) at a pipe that a thread drains into the log; lm4lv writes through
  :func:`console_file`, which keeps the real console.
* Launched jobs: :func:`launched` sends the launcher's output (and so its workers') to the log
  and relays a named pipe to the console; each worker opens it with :func:`attach_console`
  (environment variable ``LM4LV_CONSOLE``). Where the pipe cannot be made or opened (another
  node), output goes where it went before.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, TextIO

CONSOLE_ENV = "LM4LV_CONSOLE"        # named pipe a launched worker writes lm4lv's lines to
CONSOLE_TTY_ENV = "LM4LV_CONSOLE_TTY"  # "1": the console is a terminal (draw live progress bars)
LOG_ENV = "LM4LV_LOG"                # the job's log file, for lm4lv's own lines of launched workers

_console: TextIO | None = None  # the user's console while output is captured or relayed
_force_terminal: bool | None = None
_log_path: Path | None = None


def console_file() -> TextIO:
    """Where lm4lv's own lines go: the user's console (``sys.stderr`` when nothing is captured)."""
    return _console if _console is not None else sys.stderr


def redirected() -> bool:
    """Whether third-party output is kept off the console now."""
    return _console is not None


def console(**kwargs: Any):
    """A rich ``Console`` on :func:`console_file` (for progress bars and tables of workers)."""
    from rich.console import Console

    kwargs.setdefault("force_terminal", _force_terminal)
    return Console(file=console_file(), **kwargs)


def say(message: str) -> None:
    """One lm4lv status line: on the console, and in the job's log file when there is one."""
    f = console_file()
    f.write(message + "\n")
    f.flush()
    if _log_path is not None:
        with contextlib.suppress(OSError), open(_log_path, "a", encoding="utf-8") as log:
            log.write(f"[lm4lv] {message}\n")


def note(log_path: str | os.PathLike, message: str) -> None:
    """Append one lm4lv line to a log file only (e.g. where a job starts)."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"[lm4lv] {message}\n")


def _held_back(data: bytes, end: bytes) -> int:
    """How many bytes at the end of ``data`` could be the start of ``end`` (kept until the next read)."""
    for k in range(min(len(end) - 1, len(data)), 0, -1):
        if end.startswith(data[-k:]):
            return k
    return 0


def _drain(fd: int, log: BinaryIO | None, echo: TextIO | None, end: bytes | None = None) -> None:
    """Copy everything read from ``fd`` into ``log`` and/or ``echo`` until end of file, or until the
    marker ``end`` (which is not copied)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                data, done = pending, True
            elif end is None:
                data, done = chunk, False
            else:
                data = pending + chunk
                at = data.find(end)
                done = at >= 0
                if done:
                    data = data[:at]
                    pending = b""
                else:
                    keep = _held_back(data, end)
                    data, pending = (data[:-keep], data[-keep:]) if keep else (data, b"")
            if data and log is not None:
                log.write(data)
                log.flush()
            if data and echo is not None:
                echo.write(decoder.decode(data))
                echo.flush()
            if done:
                break
    except (OSError, ValueError):  # the log or the console went away: stop quietly
        pass
    finally:
        os.close(fd)


def _unredirected(stream: TextIO, saved: dict[int, int]) -> tuple[TextIO, bool]:
    """``stream``, or a new stream on the saved copy of its descriptor when it writes to fd 1 or 2
    (which are about to be redirected). The flag says whether a new stream was opened."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream, False  # e.g. a test runner's in-memory capture
    if fd not in saved:
        return stream, False
    enc = getattr(stream, "encoding", None) or "utf-8"
    return io.TextIOWrapper(open(os.dup(saved[fd]), "wb", buffering=0), encoding=enc,  # noqa: SIM115
                            errors="replace", line_buffering=True, write_through=True), True


@contextlib.contextmanager
def capture(log_path: str | os.PathLike, verbose: bool = False) -> Iterator[Path]:
    """Run the body with third-party output in ``log_path`` (appended; with ``verbose`` also on the
    console) and lm4lv's own output (:func:`console_file`) on the console. Nested calls keep the
    outer capture."""
    global _console, _log_path
    if _console is not None:
        yield Path(log_path)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    orig = (sys.stdout, sys.stderr)
    con, opened = _unredirected(orig[1], saved)
    log = open(log_path, "ab")  # noqa: SIM115
    r, w = os.pipe()
    # The drain stops at this marker, written once the body is done: it does not wait for every
    # copy of the pipe to close (a library may keep one: DeepSpeed's op probe leaks a dup of fd 2).
    end = b"\0lm4lv-capture-end-" + os.urandom(8).hex().encode() + b"\0"
    drain = threading.Thread(target=_drain, args=(r, log, con if verbose else None, end), daemon=True,
                             name="lm4lv-log")
    drain.start()
    os.dup2(w, 1)
    os.dup2(w, 2)
    # never closed: third-party handlers created meanwhile keep writing to fd 1/2 through them
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8", errors="replace",  # noqa: SIM115
                                  line_buffering=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8", errors="replace",  # noqa: SIM115
                                  line_buffering=True)
    _console, _log_path = con, log_path
    # Python warnings and log records go to the log whatever else handles them (e.g. a test runner)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    keep_warnings = warnings.catch_warnings()
    keep_warnings.__enter__()
    warnings.showwarning = _show_warning
    try:
        yield log_path
    finally:
        keep_warnings.__exit__(None, None, None)
        logging.getLogger().removeHandler(handler)
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for fd in saved.values():
            os.close(fd)
        sys.stdout, sys.stderr = orig
        _console, _log_path = None, None
        with contextlib.suppress(OSError):
            os.write(w, end)  # after everything the body wrote (one write below PIPE_BUF: atomic)
        os.close(w)
        drain.join(timeout=10)
        if not drain.is_alive():
            log.close()
        if opened:
            con.close()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def attach_console() -> None:
    """In a launched worker: write lm4lv's own lines to the relay of the parent's console."""
    global _console, _force_terminal, _log_path
    if os.environ.get(LOG_ENV):
        _log_path = Path(os.environ[LOG_ENV])
    path = os.environ.get(CONSOLE_ENV)
    if not path:
        return
    try:  # no reader (e.g. on another node): keep writing to stderr
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.set_blocking(fd, True)
    _console = open(fd, "w", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
    _force_terminal = os.environ.get(CONSOLE_TTY_ENV) == "1"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def launched(log_path: str | os.PathLike, relay_dir: str | os.PathLike, verbose: bool = False,
             pipe: str = "console.pipe") -> Iterator[tuple[int | None, dict[str, str]]]:
    """Parent side of a launched job: yields ``(fd, env)`` for the launcher process; its output goes
    to ``fd`` (the log, teed to the console with ``verbose``), lm4lv's lines of its workers come
    through the named pipe ``relay_dir/pipe`` (``env`` tells them where; one per node when nodes
    share ``relay_dir``) to this process's console."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    con = console_file()
    fifo = Path(relay_dir) / pipe
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    try:
        os.mkfifo(fifo)
        rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        keep = os.open(fifo, os.O_WRONLY)  # no end of file before the workers are done
    except (OSError, AttributeError):  # no named pipes here: leave the output as it is
        yield None, {}
        return
    os.set_blocking(rfd, True)
    relay = threading.Thread(target=_drain, args=(rfd, None, con), daemon=True, name="lm4lv-console")
    relay.start()
    log = open(log_path, "ab")  # noqa: SIM115
    tee = None
    if verbose:
        r, w = os.pipe()
        tee = threading.Thread(target=_drain, args=(r, log, con), daemon=True, name="lm4lv-log")
        tee.start()
        out = w
    else:
        out = log.fileno()
    env = {CONSOLE_ENV: str(fifo), CONSOLE_TTY_ENV: "1" if _isatty(con) else "0", LOG_ENV: str(log_path)}
    if _isatty(con):
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
    try:
        yield out, env
    finally:
        if tee is not None:
            os.close(out)
            tee.join(timeout=10)
        os.close(keep)
        relay.join(timeout=10)
        with contextlib.suppress(OSError):
            fifo.unlink()
        if tee is None or not tee.is_alive():
            log.close()


def tail(path: str | os.PathLike, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]
