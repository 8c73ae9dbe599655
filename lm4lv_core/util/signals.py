"""Graceful stop on SIGTERM / SIGINT / SIGHUP (cluster preemption, spot instances, Ctrl-C).

The first signal only sets a flag: training finishes its current optimizer step, writes one
complete checkpoint and raises :class:`~lm4lv_core.errors.Interrupted` (the CLI exits with
:data:`EXIT_INTERRUPTED`); ``generate`` stops after its current batch. Every rank checks the flag
once per step and the ranks agree (an all-reduce) on the step they stop at. A second signal aborts
at once (:data:`EXIT_ABORTED`).

The ``lm4lv`` parent of launched workers starts the launcher in its own session (terminal
signals reach only the parent, not the launchers, which would kill the workers) and forwards a
stop as a file beside the job file (``LM4LV_STOP_FILE`` in the workers: the stop files of every
node of the run), which every worker polls with the flag. A second signal kills the launcher and
all workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request with its progress saved; rerun to continue
EXIT_ABORTED = 130  # a second signal: stopped at once (128 + SIGINT)
STOP_FILE_ENV = "LM4LV_STOP_FILE"
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)

_state: dict[str, int | None] = {"signal": None}


def requested() -> bool:
    """Whether this process was asked to stop (a signal, or a stop file its parent, or the parent
    on another node of the run, writes: ``STOP_FILE_ENV`` lists them, ``os.pathsep``-separated)."""
    if _state["signal"] is not None:
        return True
    files = os.environ.get(STOP_FILE_ENV) or ""
    return any(os.path.exists(f) for f in files.split(os.pathsep) if f)


def request(signum: int = signal.SIGTERM) -> None:
    """Ask this process to stop at its next safe point (as the first signal does)."""
    if _state["signal"] is None:
        _state["signal"] = int(signum)


@contextlib.contextmanager
def handling(on_stop: Callable[[], None] | None = None, on_abort: Callable[[], None] | None = None,
             announce: bool = True) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM/SIGHUP requests a stop (``on_stop`` runs), a
    second one runs ``on_abort`` and raises ``KeyboardInterrupt``. Signals that were ignored
    (``nohup``) stay ignored; the previous handlers come back afterwards. Outside the main thread
    nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame) -> None:
        if _state["signal"] is None:
            _state["signal"] = signum
            if announce:
                from .logs import say

                say(f"{signal.Signals(signum).name} received: finishing the current step, then saving and "
                    "stopping (send it again to abort at once)")
            if on_stop is not None:
                on_stop()
            return
        for s in previous:
            signal.signal(s, signal.SIG_DFL)  # a third signal ends the process at once
        if on_abort is not None:
            on_abort()
        raise KeyboardInterrupt

    for s in SIGNALS:
        current = signal.getsignal(s)
        if current is signal.SIG_IGN:
            continue
        previous[s] = current
        signal.signal(s, handler)
    _state["signal"] = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state["signal"] = None


def ignore_interrupts(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loading processes: a terminal's Ctrl-C reaches the whole process
    group, and a loader process killed by it would break the step the trainer is finishing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
