"""The progress bar: label, count, total known late, free info text; nothing drawn when hidden."""

from __future__ import annotations

import io

from rich.console import Console

from lm4lv_core.util import logs
from lm4lv_core.util.progress import progress_bar, rank0_progress


def test_progress_bar_columns_and_hidden_bars(monkeypatch):
    screens: list[io.StringIO] = []

    def console(**kwargs):
        screens.append(io.StringIO())
        return Console(file=screens[-1], force_terminal=True, width=100, color_system=None)

    monkeypatch.setattr(logs, "console", console)
    with progress_bar("eval") as bar:  # total unknown until the first update (lm4lv eval, make-data)
        bar.update(3, 7)
    with progress_bar("[bold]train", 10, completed=4, transient=False, info=True) as bar:
        bar.update(5, info="loss=0.25")
    shown = screens[1].getvalue().split("\r\x1b[2K")[-1].split("\n")[0]  # the last redraw
    assert "eval" in screens[0].getvalue() and "3/7" in screens[0].getvalue()
    assert shown.startswith("train ") and "5/10" in shown and shown.rstrip().endswith("loss=0.25")
    with progress_bar("x", 2, show=False) as bar, rank0_progress("y", 2, show=False) as advance:
        bar.advance(1)
        bar.update(2, info="-")
        advance(2)
    assert len(screens) == 2  # hidden bars never open a console
