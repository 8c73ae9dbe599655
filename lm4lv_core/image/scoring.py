"""Scoring image pairs in parallel processes for ``lm4lv eval``.

:class:`Scorer` scores (gt, pred) pairs in this process (``workers=1``) or in ``workers`` spawned
processes (never forked: the parent may run threads). Pairs go out in chunks, a bounded window of
chunks is in flight, and rows come back in the order of the pairs, so the output does not depend
on the number of workers. A worker imports only what its metrics need (torch only for LPIPS) and
builds the LPIPS module once. Memory stays flat in the number of pairs: only the window's chunks
and the (small) rows are held.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

from ..errors import ConfigError, LM4LVError

MAX_DEFAULT_WORKERS = 8
MIN_PAIRS_PER_WORKER = 32  # below this a default --workers scores in this process


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(n_pairs: int) -> int:
    """The machine's cores (at most :data:`MAX_DEFAULT_WORKERS`), fewer for few pairs."""
    return max(1, min(cpu_count(), MAX_DEFAULT_WORKERS, n_pairs // MIN_PAIRS_PER_WORKER))


def resolve_device(device: str | None) -> str:
    """``auto`` / ``None``: ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device == "cpu":
        return "cpu"  # without importing torch
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r}: not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no GPU is visible to torch here")
    return str(dev)


# ---------------------------------------------------------------------------- per process
_STATE: dict[str, Any] = {}


def _init(metrics: list[str], settings: dict[str, Any], lpips_net: str, lpips_weights: str | None,
          device: str | None) -> None:
    """Worker initializer: plugins, then the LPIPS module once per process."""
    from ..plugins import load_environment

    load_environment()
    _STATE.update(metrics=metrics, settings=settings, lpips=None)
    if "lpips" in metrics:
        import torch

        torch.set_num_threads(1)
        from .metrics import build_lpips

        _STATE["lpips"] = build_lpips(lpips_net, lpips_weights).to(resolve_device(device))


def _score_chunk(chunk: Sequence[tuple[int, str, str]]) -> list[tuple[int, dict | None, str | None]]:
    """``(index, row, None)`` or ``(index, None, reason)`` for every pair of ``chunk``."""
    from .metrics import score_pair

    st = _STATE["settings"]
    out = []
    for i, g, p in chunk:
        try:
            row = score_pair(g, p, _STATE["metrics"], st["crop_border"], st["y_channel"],
                             st["resize_to_smaller"], _STATE["lpips"])
            out.append((i, row, None))
        except LM4LVError as e:
            out.append((i, None, str(e)))
    return out


# ---------------------------------------------------------------------------- parent
class Scorer:
    """``with Scorer(metrics, settings, workers=N) as s: rows = s.score(pairs)``; one pool serves
    every ``score`` call (``lm4lv eval`` with several prediction folders)."""

    def __init__(self, metrics: Sequence[str], settings: dict[str, Any], *, lpips_net: str = "alex",
                 lpips_weights: str | os.PathLike | None = None, lpips_module: Any = None,
                 workers: int | None = 1, device: str | None = None) -> None:
        from .metrics import LPIPS_NETS, lpips_weights_file

        self.metrics, self.settings = list(metrics), dict(settings)
        self.workers = workers
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.lpips_module = lpips_module
        self.lpips_net = getattr(lpips_module, "net_name", lpips_net)
        self.lpips_weights = str(lpips_weights) if lpips_weights is not None else None
        self.device = None
        self.pool: ProcessPoolExecutor | None = None
        self.pool_size = 0
        if "lpips" in self.metrics and lpips_module is None:
            if lpips_net not in LPIPS_NETS:
                raise ConfigError(f"unknown LPIPS network {lpips_net!r}; valid: {', '.join(LPIPS_NETS)}")
            lpips_weights_file(lpips_net, lpips_weights)  # a missing file fails before any scoring
            # an explicit GPU is checked here, before any scoring; `auto` is resolved by the process
            # that builds LPIPS (so that a parent of workers does not import torch for it)
            self.device = "auto" if device in (None, "", "auto") else resolve_device(device)
        elif device not in (None, "", "auto", "cpu") and "lpips" in self.metrics:
            self.device = resolve_device(device)

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _local(self) -> None:
        if not _STATE or _STATE.get("owner") is not self:
            _STATE.clear()
            _STATE.update(metrics=self.metrics, settings=self.settings, lpips=self.lpips_module, owner=self)
            if "lpips" in self.metrics and self.lpips_module is None:
                from .metrics import build_lpips

                self.lpips_module = build_lpips(self.lpips_net, self.lpips_weights).to(resolve_device(self.device))
                _STATE["lpips"] = self.lpips_module

    def _pool(self, n: int) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool_size = n
            args = (self.metrics, self.settings, self.lpips_net, self.lpips_weights, self.device)
            self.pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init,
                                            initargs=args)
        return self.pool

    def score(self, pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], *,
              progress: Callable[[int, int], None] | None = None, on_error: str = "stop",
              failures: list[tuple[str, str]] | None = None, done: dict[int, dict] | None = None,
              on_row: Callable[[int, dict], None] | None = None, collect: bool = True) -> list[dict]:
        """Rows of ``pairs`` in their order (failed ones left out under ``on_error="skip"``).

        ``pairs`` is read by index as the pairs go out (a :class:`~lm4lv_core.image.pairs.PairPlan`
        is never expanded); ``collect=False`` keeps no row (``on_row`` takes each) and returns []."""
        done = done or {}
        total, count = len(pairs), len(done)
        results: dict[int, dict] = dict(done) if collect else {}
        if progress and count:
            progress(count, total)
        n_todo = total - sum(1 for i in done if 0 <= i < total)
        n = self.workers if self.workers is not None else default_workers(n_todo)
        if self.lpips_module is not None:
            n = 1  # a module given by the caller is used here
        n = max(1, min(n, n_todo))

        def chunks(step: int) -> Iterator[list[tuple[int, str, str]]]:
            chunk: list[tuple[int, str, str]] = []
            for i in range(total):
                if i in done:
                    continue
                g, p = pairs[i]
                chunk.append((i, str(g), str(p)))
                if len(chunk) == step:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        def take(batch: list[tuple[int, dict | None, str | None]]) -> None:
            nonlocal count
            for i, row, err in batch:
                if err is not None:
                    if on_error != "skip":
                        raise LM4LVError(err)
                    if failures is not None:
                        path = str(pairs[i][1])
                        failures.append((path, err[len(path) + 2:] if err.startswith(path + ": ") else err))
                else:
                    if collect:
                        results[i] = row
                    if on_row:
                        on_row(i, row)
            count += len(batch)
            if progress:
                progress(count, total)

        if n == 1 and self.pool is None:
            self._local()
            for chunk in chunks(8):
                take(_score_chunk(chunk))
        else:
            pool = self._pool(n)
            step = max(1, min(16, n_todo // (self.pool_size * 8) or 1))
            pending: deque = deque()
            try:
                for chunk in chunks(step):
                    pending.append(pool.submit(_score_chunk, chunk))
                    if len(pending) >= 4 * self.pool_size:
                        take(pending.popleft().result())
                while pending:
                    take(pending.popleft().result())
            except BrokenProcessPool:
                raise RuntimeError("lm4lv eval worker processes died; when scoring with workers > 1 from a "
                                   "script, put the call under `if __name__ == '__main__':`") from None
            finally:
                for f in pending:
                    f.cancel()
        return [results[i] for i in sorted(results)]
