"""A rich progress bar shown by one process (rank 0); other ranks count silently."""

from __future__ import annotations

from . import logs


class rank0_progress:
    """``with rank0_progress(label, total, show=rank == 0) as advance: ... advance(n)``.

    Drawn on stderr (stdout stays free for results) and removed when done.
    """

    def __init__(self, label: str, total: int, show: bool = True):
        self.label, self.total, self.show = label, total, show
        self.bar = None

    def __enter__(self):
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=logs.console(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total)
        return self.advance

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
