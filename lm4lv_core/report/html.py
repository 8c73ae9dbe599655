"""The comparison page: one static HTML file a person opens from disk (no network), for
``lm4lv eval --html`` and the quickstart.

The page holds its own small CSS and JavaScript; the per-image data is a sidecar script
``<page>_files/data.js`` (so the page itself stays a few kilobytes whatever the number of images),
and images are referenced by relative paths (thumbnails are written into ``<page>_files/thumbs``
only for images larger than :data:`THUMB_SIZE`). The builder takes the eval data (labels,
metrics, per-folder rows, settings, unmatched names) and knows nothing of how they were scored.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from ..errors import ConfigError
from ..util.fsutil import atomic_path, write_text_atomic

GENERATOR = "lm4lv comparison page"  # <meta name="generator">: tells --overwrite the page is lm4lv's own
THUMB_SIZE = 128  # images larger than this get a thumbnail for the table
PAGE_SIZES = (25, 50, 100, 500)


def files_dir(page: str | os.PathLike) -> Path:
    """The folder beside ``page`` that holds its data, thumbnails and generated images."""
    page = Path(page)
    return page.with_name(page.stem + "_files")


def is_own_page(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a page this module wrote (so ``--overwrite`` may replace it)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return f'<meta name="generator" content="{GENERATOR}">' in head


def check_page_target(path: str | os.PathLike, overwrite: bool, option: str = "--html") -> None:
    """``path`` must be new, or a page of ours with ``overwrite``."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if p.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{option} {path}: give a file name ending in .html")
    if p.exists():
        if not overwrite:
            raise ConfigError(f"{option} {path}: exists; pass --overwrite to replace it, or choose another file")
        if not is_own_page(p):
            raise ConfigError(f"{option} {path}: exists and was not written by lm4lv; --overwrite replaces only "
                              "lm4lv's own pages: choose another file")


@dataclass
class PageRow:
    """One image: its ``name`` (and ``group``, e.g. the degradation), the ground truth, one
    prediction per folder (None where that folder has none) and its scores per folder."""

    name: str
    gt: str | None
    preds: list[str | None]
    values: list[dict[str, float] | None]
    group: str = ""


@dataclass
class PageStats:
    """What :func:`write_page` wrote: the page, its data file, sizes in bytes, thumbnails made."""

    page: Path
    data: Path
    page_bytes: int
    data_bytes: int
    images: int
    thumbnails: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rows_from_folders(folder_rows: Sequence[Sequence[dict[str, Any]]], metrics: Sequence[str],
                      group: str = "") -> list[PageRow]:
    """:class:`PageRow` per image name from each folder's eval rows (``name``, ``gt``, ``pred`` and
    the metrics), in the order the names first appear."""
    order: dict[str, PageRow] = {}
    n = len(folder_rows)
    for k, rows in enumerate(folder_rows):
        for r in rows:
            row = order.get(r["name"])
            if row is None:
                row = order[r["name"]] = PageRow(r["name"], r.get("gt"), [None] * n, [None] * n, group)
            row.preds[k] = r.get("pred")
            row.values[k] = {m: float(r[m]) for m in metrics if m in r}
            row.gt = row.gt or r.get("gt")
    return list(order.values())


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def group_means(rows: Sequence[PageRow], labels: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per group (all rows when there is one group): each folder's mean, count and its mean
    difference to the first folder over the images both scored."""
    groups = list(dict.fromkeys(r.group for r in rows)) or [""]
    out = []
    for g in groups:
        sel = [r for r in rows if r.group == g]
        entry: dict[str, Any] = {"group": g or "all images", "count": [], "mean": [], "diff": []}
        for k in range(len(labels)):
            have = [r for r in sel if r.values[k] is not None]
            entry["count"].append(len(have))
            entry["mean"].append([_mean([r.values[k].get(m) for r in have]) for m in metrics])
            both = [r for r in have if r.values[0] is not None]
            entry["diff"].append(None if k == 0 else
                                 [_mean([r.values[k][m] - r.values[0][m] for r in both]) for m in metrics])
        out.append(entry)
    return out


def _url(target: str | os.PathLike, base: Path) -> str:
    rel = os.path.relpath(os.path.abspath(target), base)
    return quote(Path(rel).as_posix(), safe="/")


def _split_prefix(urls: list[str | None]) -> tuple[str, list[str | None]]:
    """A common folder prefix of ``urls`` and the rests (keeps the data file small)."""
    have = [u for u in urls if u is not None]
    if not have:
        return "", urls
    prefix = os.path.commonprefix(have)
    prefix = prefix[:prefix.rfind("/") + 1]
    return prefix, [None if u is None else u[len(prefix):] for u in urls]


def _thumbnail(src: str, dst: Path, size: int) -> bool:
    """Write a JPEG thumbnail of ``src`` if it is larger than ``size``; False if it is small enough."""
    from PIL import Image

    with Image.open(src) as im:
        if max(im.size) <= size:
            return False
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        with atomic_path(dst, suffix=".jpg") as tmp:
            im.save(tmp, format="JPEG", quality=85)
    return True


def _asset(name: str) -> str:
    return resources.files("lm4lv_core.report").joinpath("assets", name).read_text(encoding="utf-8")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="{generator}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body>
<h1 id="title">{title}</h1>
<div id="notes"></div>
<h2>Means</h2>
<div id="means"></div>
<details><summary>Settings</summary><ul id="settings"></ul></details>
<details><summary>Unmatched images</summary><div id="unmatched"></div></details>
{extra}
<h2>Comparison</h2>
<div class="bar">
 <button id="prev" title="previous image (k)">&#9664;</button><button id="next" title="next image (j)">&#9654;</button>
 <b id="curname"></b>
 <label>left <select id="selL" title="a / A"></select></label>
 <label>right <select id="selR" title="b / B"></select></label>
 <button id="swap" title="s">swap</button>
 <button id="zout" title="-">&minus;</button><span id="zoominfo">1&times;</span><button id="zin" title="+">+</button>
 <button id="zfit" title="0">fit</button>
</div>
<div id="view" tabindex="0">
 <div class="layer" id="layerL"><div class="stage" id="stageL"><img id="imgL" alt="left"></div></div>
 <div class="layer" id="layerR"><div class="stage" id="stageR"><img id="imgR" alt="right"></div></div>
 <div id="divider"></div><span class="tag" id="tagL"></span><span class="tag" id="tagR"></span>
</div>
<input type="range" id="slider" min="0" max="100" step="0.5" value="50" aria-label="before / after">
<p class="muted">Keys: <kbd>j</kbd>/<kbd>k</kbd> next/previous image, <kbd>a</kbd>/<kbd>b</kbd> change the left/right
image (<kbd>A</kbd>/<kbd>B</kbd> back), <kbd>s</kbd> swap, <kbd>&larr;</kbd>/<kbd>&rarr;</kbd> move the split,
<kbd>+</kbd>/<kbd>-</kbd> zoom, <kbd>0</kbd> fit. Drag to pan, wheel to zoom (up to 64&times;, pixels drawn as squares).</p>
<table id="scores"></table>
<h2>Images</h2>
<div class="bar">
 <input id="filter" placeholder="filter by name" size="30"> <select id="group"><option value="">all groups</option></select>
 <label>per page <select id="psize">{sizes}</select></label>
 <button id="pprev">&#9664;</button><span id="pageinfo"></span><button id="pnext">&#9654;</button>
 <span class="muted">click a column to sort (again: reverse), a row to compare</span>
</div>
<table id="rows"></table>
<script src="{data}"></script>
<script>{js}</script>
</body></html>
"""


def write_page(path: str | os.PathLike, *, title: str, labels: Sequence[str], metrics: Sequence[str],
               rows: Sequence[PageRow], settings: dict[str, Any] | None = None,
               unmatched: Iterable[dict[str, Any]] = (), notes: Iterable[str] = (), extra_html: str = "",
               thumb_size: int = THUMB_SIZE) -> PageStats:
    """Write the page ``path`` and ``<page>_files/data.js`` (and thumbnails), atomically."""
    from ..image.metrics import METRICS

    path = Path(path).absolute()
    base, side = path.parent, files_dir(path)
    side.mkdir(parents=True, exist_ok=True)
    labels, metrics = list(labels), list(metrics)
    groups = list(dict.fromkeys(r.group for r in rows))
    thumbs = 0
    thumb_urls: list[str | None] = []
    for i, r in enumerate(rows):
        src = next((p for p in reversed(r.preds) if p), r.gt)
        if src and thumb_size and _thumbnail(src, side / "thumbs" / f"{i}.jpg", thumb_size):
            thumbs += 1
            thumb_urls.append(f"{i}.jpg")
        else:
            thumb_urls.append(None)
    cols = [[None if r.gt is None else _url(r.gt, base) for r in rows]]
    cols += [[None if r.preds[k] is None else _url(r.preds[k], base) for r in rows] for k in range(len(labels))]
    prefixes, rests = zip(*(_split_prefix(c) for c in cols)) if rows else ([""] * (len(labels) + 1), [[]] * (len(labels) + 1))

    def values(r: PageRow) -> list[float | None]:
        out = []
        for v in r.values:
            out += [None if v is None or v.get(m) is None or not math.isfinite(v[m]) else round(v[m], 5) for m in metrics]
        return out

    data = {
        "title": title, "labels": labels, "metrics": metrics, "notes": list(notes),
        "higher": [METRICS.get(m).higher_is_better if m in METRICS else True for m in metrics],
        "groups": groups, "prefixes": list(prefixes),
        "thumbPrefix": _url(side / "thumbs", base) + "/",
        "rows": [[r.name, groups.index(r.group), rests[0][i], [rests[k + 1][i] for k in range(len(labels))],
                  values(r), thumb_urls[i]] for i, r in enumerate(rows)],
        "means": group_means(rows, labels, metrics), "settings": settings or {}, "unmatched": list(unmatched),
    }
    data_file = side / "data.js"
    text = "window.LM4LV_PAGE = " + json.dumps(data, separators=(",", ":"), allow_nan=False) + ";\n"
    write_text_atomic(data_file, text)
    page = PAGE.format(generator=GENERATOR, title=html.escape(title), css=_asset("page.css"), js=_asset("compare.js"),
                       data=_url(data_file, base), extra=extra_html,
                       sizes="".join(f'<option{" selected" if s == 50 else ""}>{s}</option>' for s in PAGE_SIZES))
    write_text_atomic(path, page)
    return PageStats(path, data_file, len(page.encode()), len(text.encode()), len(rows), thumbs)


def comparison_page(path: str | os.PathLike, summary: dict[str, Any], folder_rows: Sequence[Sequence[dict[str, Any]]],
                    metrics: Sequence[str], *, title: str | None = None, notes: Iterable[str] = ()) -> PageStats:
    """The page of one ``lm4lv eval``: ``summary`` as :meth:`Comparison.summary` gives it and the
    rows of every prediction folder."""
    labels = [p["label"] for p in summary["predictions"]]
    rows = rows_from_folders(folder_rows, metrics)
    if any("/" in r.name for r in rows):  # subfolders: filterable groups
        for r in rows:
            r.group = r.name.rsplit("/", 1)[0] if "/" in r.name else "."
    unmatched = [{"label": p["label"], "gt": p.get("unmatched_gt", []), "pred": p.get("unmatched_pred", [])}
                 for p in summary["predictions"]]
    title = title or f"lm4lv eval: {', '.join(labels)} vs {summary['gt']}"
    return write_page(path, title=title, labels=labels, metrics=metrics, rows=rows, settings=summary.get("settings"),
                      unmatched=unmatched, notes=notes)
