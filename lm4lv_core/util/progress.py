"""The one rich progress bar of lm4lv: drawn on the console's stderr (stdout stays free for
results), by one process (rank 0); other ranks pass ``show=False`` and count silently."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from . import logs


class progress_bar:
    """``with progress_bar(label, total) as bar: ... bar.advance(n)`` (or ``bar.update(done, total)``).

    Columns: ``label`` (rich markup allowed), the bar, ``done/total``, (``rate=True``: items per
    second), the time remaining and, with
    ``info=True``, a free text set by ``update(..., info=...)``. ``total=None`` is unknown until
    the first ``update``; ``transient`` removes the bar when done. ``show=False`` draws nothing.
    Outside a ``with`` block, ``start()`` / ``close()`` do the same.
    """

    def __init__(self, label: str, total: int | None = None, *, show: bool = True, transient: bool = True,
                 completed: int = 0, info: bool = False, rate: bool = False) -> None:
        self.bar = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
            if rate:  # items per second, for long folder jobs
                columns.insert(3, _rate_column())
            if info:
                columns.append(TextColumn("{task.fields[info]}"))
            self.bar = Progress(*columns, console=logs.console(), transient=transient)
            self.task = self.bar.add_task(label, total=total, completed=completed, info="")

    def start(self) -> "progress_bar":
        if self.bar is not None:
            self.bar.start()
        return self

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> "progress_bar":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def update(self, completed: int, total: int | None = None, **fields: Any) -> None:
        """Set the count (and the total, and the ``info`` text when the bar has one)."""
        if self.bar is not None:
            if total is not None:
                fields["total"] = total
            self.bar.update(self.task, completed=completed, **fields)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")

    return RateColumn()


@contextlib.contextmanager
def rank0_progress(label: str, total: int, show: bool = True, rate: bool = False) -> Iterator[Callable[[int], None]]:
    """``with rank0_progress(label, total, show=rank == 0) as advance: ... advance(n)``."""
    with progress_bar(label, total, show=show, rate=rate) as bar:
        yield bar.advance
