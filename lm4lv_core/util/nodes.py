"""The nodes of a multi-node job keep an eye on each other through the shared run folder.

Each node's ``lm4lv`` process keeps a small record ``FOLDER/node-R.json`` (host, pid, state, a
heartbeat counter) that a thread rewrites every ``interval`` seconds while the command runs, and
writes its outcome into it at the end (``done``, ``interrupted``, ``error`` with the message,
...). The records are rewritten in place, not replaced: on NFS a reader's ``open`` then always
sees the latest content (close-to-open consistency).

A :class:`Watch` reads the other nodes' records and tells, measured on this node's own clock (no
clock comparison between nodes), which peer ended badly and which one went silent: a node that
dies stops its heartbeat. A record only counts once it changed while this node was watching, so
a record left by an earlier run in the same folder is never mistaken for a live node.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LM4LVError

RUNNING = "running"
STOPPING = "stopping"  # its workers failed; it is finding out why (a node of a broken run)
FINAL_OK = ("done", "interrupted")
BAD = ("error", "failed", "aborted", STOPPING)


class NodeLost(LM4LVError):
    """This node stopped because of another one (``node``): it was lost, or ended badly first."""

    def __init__(self, message: str, node: int) -> None:
        super().__init__(message)
        self.node = node

    def __reduce__(self):
        return (type(self), (str(self), self.node))


def record_path(folder: str | os.PathLike, node: int) -> Path:
    return Path(folder) / f"node-{node}.json"


class Presence:
    """This node's record: written at :meth:`start`, refreshed by a thread, closed by :meth:`finish`."""

    def __init__(self, folder: str | os.PathLike, node: int, interval: float) -> None:
        self.path = record_path(folder, node)
        self.interval = interval
        self.info: dict[str, Any] = {"node": node, "host": socket.gethostname(), "pid": os.getpid(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "state": RUNNING,
                                     "message": "", "beat": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lm4lv-heartbeat")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self.info["state"] not in (RUNNING, STOPPING):
                    return
                self.info["beat"] += 1
                self._write()

    def _write(self) -> None:
        data = (json.dumps(self.info) + "\n").encode()
        with contextlib.suppress(OSError):  # a full disk must not kill the run; peers see silence
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)

    def set_state(self, state: str, message: str = "", because: int | None = None) -> None:
        """``because``: the node whose failure this one follows (not a cause of its own)."""
        with self._lock:
            self.info.update(state=state, message=message, because=because)
            self.info["beat"] += 1
            self._write()

    def finish(self, state: str, message: str = "", because: int | None = None) -> None:
        self.set_state(state, message, because)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass
class Peer:
    """What this node has seen of another node's record."""

    node: int
    raw: bytes | None = None
    record: dict[str, Any] = field(default_factory=dict)
    live: bool = False  # its record changed while we watched: it belongs to this run
    changed: float = field(default_factory=time.monotonic)
    gap: float = 0.0  # the longest time between two changes seen (slow shared filesystems)

    def describe(self) -> str:
        host, pid = self.record.get("host"), self.record.get("pid")
        return f"node {self.node}" + (f" (host {host}, pid {pid})" if host else "")


class Watch:
    """This node's view of the other ``num_nodes - 1`` nodes' records in ``folder``."""

    def __init__(self, folder: str | os.PathLike, node: int, num_nodes: int, interval: float) -> None:
        self.folder = Path(folder)
        self.interval = interval
        self.started = time.monotonic()
        self.peers = {r: Peer(r) for r in range(num_nodes) if r != node}
        for p in self.peers.values():
            p.raw = self._read(p.node)  # the baseline: possibly an earlier run's record

    def _read(self, node: int) -> bytes | None:
        try:
            with open(record_path(self.folder, node), "rb") as f:
                return f.read()
        except OSError:
            return None

    def poll(self) -> None:
        now = time.monotonic()
        for p in self.peers.values():
            raw = self._read(p.node)
            if raw is None or raw == p.raw:
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # caught mid-rewrite: read it next time
                continue
            if p.live:
                p.gap = max(p.gap, now - p.changed)
            p.raw, p.record, p.live, p.changed = raw, record, True, now

    def silent_for(self, p: Peer) -> float:
        return time.monotonic() - p.changed

    def lost_after(self, p: Peer) -> float:
        """Silence that makes a live node count as gone once the run is known to be broken: a few
        heartbeats as this node sees them arrive."""
        return max(3 * self.interval, 2 * p.gap) + self.interval

    def problem(self, timeout: float) -> tuple[int, str] | None:
        """Why this node should stop now, as ``(node, message)``: a peer ended badly, went silent
        for ``timeout`` seconds, or never appeared within ``timeout``; ``None`` while all is well."""
        self.poll()
        for p in self.peers.values():
            state = p.record.get("state")
            if p.live and state in BAD:
                return p.node, f"{p.describe()} stopped: {_outcome(p.record)}"
            if p.live and state == RUNNING and self.silent_for(p) > timeout:
                return p.node, (f"{p.describe()} stopped responding: no sign of life for "
                                f"{self.silent_for(p):.0f} s (--node-timeout {timeout:g})")
            if not p.live and self.silent_for(p) > timeout:
                return p.node, self._never_started(p, timeout)
        return None

    def _never_started(self, p: Peer, waited: float) -> str:
        last = ""
        with contextlib.suppress(ValueError, TypeError):
            old = json.loads(p.raw or b"")
            last = f"; its record from an earlier start ({old.get('started')}) says {_outcome(old)}"
        return (f"node {p.node} did not start: no sign of it in {record_path(self.folder, p.node)} "
                f"for {waited:.0f} s{last}")

    def explain(self, timeout: float) -> list[tuple[int, str]]:
        """After this node's workers failed: wait (at most ``timeout``) until every live peer has
        ended or gone silent, and name, as ``(node, message)``, the ones that were lost or ended
        badly on their own (not those that stopped because of another node)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            pending = [p for p in self.peers.values()
                       if p.live and p.record.get("state") == RUNNING and self.silent_for(p) <= self.lost_after(p)]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, self.interval / 2))
        found = []
        for p in self.peers.values():
            state = p.record.get("state")
            if not p.live:
                found.append((p.node, self._never_started(p, time.monotonic() - self.started)))
            elif state == RUNNING and self.silent_for(p) > self.lost_after(p):
                found.append((p.node, f"lost {p.describe()}: no sign of life for {self.silent_for(p):.0f} s"))
            elif state in ("error", "failed", "aborted") and p.record.get("because") is None:
                found.append((p.node, f"{p.describe()} stopped: {_outcome(p.record)}"))
        return found


def _outcome(record: dict[str, Any]) -> str:
    state, message = record.get("state"), record.get("message") or ""
    return f"{state}: {message}" if message else str(state)
