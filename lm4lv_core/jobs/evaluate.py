"""Several prediction folders scored against one ground truth (``lm4lv eval METRICS GT PRED PRED ...``):
per folder the mean of every metric and its difference to the first folder, per image rows, and a
labelled grid of chosen pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError, LM4LVError
from ..util.fsutil import JsonStream, write_csv_atomic, write_json_atomic, write_text_atomic
from ..image.metrics import METRICS, EvalReport, check_on_error, plan_pairs, report_of, validate_metrics
from ..image.pairs import PairPlan, ScoredRows

GRID_TILE_MAX = 256  # larger images are shown reduced in grids
GRID_SOFTWARE = "lm4lv eval"  # the PNG text chunk "Software" of a grid: tells --overwrite it is ours


def default_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short distinct names: the last path component, with parents added until all differ."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


@dataclass
class Comparison:
    """One :class:`EvalReport` per prediction folder (same ground truth, same settings)."""

    gt: str
    labels: list[str]
    paths: list[str]
    reports: list[EvalReport]
    metrics: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) skipped by --on-error skip
    _index: dict[int, dict[str, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def settings(self) -> dict[str, Any]:
        return self.reports[0].settings

    def mean(self, k: int) -> dict[str, float]:
        return {m: self.reports[k].mean(m) for m in self.metrics}

    def _positions(self, k: int) -> dict[str, int]:
        """Image name → position of its row in folder ``k`` (a dictionary join, built once)."""
        index = self._index.get(k)
        rows = self.reports[k].rows
        if index is None or len(index) != len(rows):
            names = rows.names() if isinstance(rows, ScoredRows) else (r["name"] for r in rows)
            index = self._index[k] = {n: j for j, n in enumerate(names)}
        return index

    def common_names(self) -> list[str]:
        """Images every folder scored, in the first folder's order."""
        others = [self._positions(k) for k in range(1, len(self.reports))]
        return [n for n in self._positions(0) if all(n in o for o in others)]

    def row(self, k: int, name: str) -> dict[str, Any]:
        """Folder ``k``'s row of image ``name``."""
        return self.reports[k].rows[self._positions(k)[name]]

    def difference(self, k: int) -> dict[str, float]:
        """Mean over the images both folders scored of (folder ``k`` − first folder)."""
        first, here = self._positions(0), self._positions(k)
        joined = [(j, first[n]) for n, j in here.items() if n in first]
        if not joined:
            return {m: float("nan") for m in self.metrics}
        mine, theirs = (np.asarray(x, dtype=np.int64) for x in zip(*joined))
        return {m: float(np.mean(self.reports[k].values(m)[mine] - self.reports[0].values(m)[theirs]))
                for m in self.metrics}

    def summary(self) -> dict[str, Any]:
        preds = []
        for k, (label, path, rep) in enumerate(zip(self.labels, self.paths, self.reports)):
            preds.append({"label": label, "path": path, "count": rep.count, "mean": self.mean(k),
                          "difference_to_first": self.difference(k) if k else None,
                          "unmatched_gt": rep.unmatched_gt, "unmatched_pred": rep.unmatched_pred})
        return {"gt": self.gt, "first": self.labels[0], "settings": self.settings, "predictions": preds}

    def write_json(self, path: str | os.PathLike) -> None:
        data = self.summary()
        for entry, rep in zip(data["predictions"], self.reports):
            entry["images"] = JsonStream(rep.rows)
        write_json_atomic(path, data)

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per (folder, image): ``label, name, gt, pred`` and the metrics."""
        rows = ({"label": label, **r} for label, rep in zip(self.labels, self.reports) for r in rep.rows)
        write_csv_atomic(path, ["label", "name", "gt", "pred", *self.metrics], rows)


def compare_paths(metrics: Sequence[str] | str, gt: str | os.PathLike, preds: Sequence[str | os.PathLike],
                  labels: Sequence[str] | None = None,
                  progress: Callable[[int, int], None] | None = None, *, workers: int | None = 1,
                  device: str | None = None, on_error: str = "stop", journal: "Journal | None" = None,
                  **kwargs: Any) -> Comparison:
    """Score every folder (or file) of ``preds`` against ``gt`` like
    :func:`lm4lv_core.image.metrics.evaluate_paths`, with one pool of ``workers`` processes for all.

    ``on_error``: ``stop`` (the first failed pair is one error naming it) or ``skip`` (failed pairs
    are left out and listed in ``Comparison.failures``). ``journal``: streams every row as it is
    scored and hands back the rows of an interrupted run (:class:`Journal`)."""
    from ..image.scoring import Scorer

    metrics = validate_metrics(metrics)
    check_on_error(on_error)
    if not preds:
        raise ConfigError("give at least one prediction folder")
    labels = list(labels) if labels else default_labels(preds)
    if len(labels) != len(preds):
        raise ConfigError(f"--labels: {len(labels)} label(s) for {len(preds)} prediction folder(s)")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--labels: names must differ, got {', '.join(labels)}")
    for p in [gt, *preds]:  # fail before scoring anything
        if not Path(p).exists():
            raise LM4LVError(f"{p}: no such file or folder")
    plans = [plan_pairs(gt, p) for p in preds]
    total = sum(len(pl[0]) for pl in plans)
    settings = {k: kwargs[k] for k in ("crop_border", "y_channel", "resize_to_smaller") if k in kwargs}
    lpips_opts = {k: kwargs.pop(k) for k in ("lpips_net", "lpips_weights", "lpips_module") if k in kwargs}
    from ..defaults import CROP_BORDER

    settings = {"crop_border": settings.get("crop_border", CROP_BORDER), "y_channel": settings.get("y_channel", False),
                "resize_to_smaller": settings.get("resize_to_smaller", False)}
    reports, failures, base = [], [], 0
    with Scorer(metrics, settings, workers=workers, device=device, **lpips_opts) as scorer:
        for k, (planned, only_gt, only_pred) in enumerate(plans):
            def step(i: int, n: int, b: int = base) -> None:
                if progress:
                    progress(b + i, total)

            done = journal.done(k, planned) if journal else None
            on_row = (lambda i, row, k=k: journal.add(k, i, row)) if journal else None
            rep = report_of(metrics, planned, only_gt, only_pred, progress=step, workers=workers, device=device,
                            on_error=on_error, failures=failures, done=done, on_row=on_row, _scorer=scorer,
                            **kwargs)
            base += len(planned)
            reports.append(rep)
    if failures and not any(rep.count for rep in reports):
        raise LM4LVError(f"eval: every one of the {len(failures)} pair(s) failed; the first: {failures[0][0]}: "
                         f"{failures[0][1]}")
    return Comparison(str(gt), labels, [str(p) for p in preds], reports, list(metrics), failures)


class Journal:
    """The rows of an ``lm4lv eval`` in progress, streamed to ``FILE.partial.jsonl`` beside its first
    output file as they are scored (one JSON line each, flushed), so that ``--resume`` after an
    interruption scores only the rest. The first line records what is scored (metrics, folders,
    labels, settings); a resume with anything else is refused. Removed once the outputs are written."""

    FORMAT = "lm4lv-eval-partial"

    def __init__(self, path: Path, identity: dict[str, Any], resume: bool, overwrite: bool) -> None:
        self.path = path
        self.identity = identity
        self.rows: dict[tuple[int, str], dict] = {}
        if path.exists() and resume:
            self._read()
        elif path.exists() and not overwrite:
            raise ConfigError(f"{path}: an interrupted lm4lv eval left its scores here; pass --resume to "
                              "continue it or --overwrite to start again")
        self.f = None

    def _read(self) -> None:
        import json

        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if head.get("format") != self.FORMAT:
            raise ConfigError(f"--resume: {self.path} is not the record of an interrupted lm4lv eval; "
                              "remove it or pass --overwrite")
        old = head.get("identity", {})
        changed = [k for k in self.identity if old.get(k) != self.identity[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"--resume: {self.path} was scored with other settings ({k} {old.get(k)!r}, now "
                              f"{self.identity[k]!r}); run with the same settings, or pass --overwrite to start again")
        for line in lines[1:]:
            if not line.endswith("\n"):
                continue  # torn by the interruption
            try:
                rec = json.loads(line)
                self.rows[(int(rec["k"]), rec["row"]["pred"])] = rec["row"]
            except (ValueError, KeyError, TypeError):
                continue

    def open(self) -> "Journal":
        import json

        from ..util.fsutil import writing

        with writing(self.path):
            if self.rows:  # rewrite: drop a torn last line, keep what was scored
                lines = [json.dumps({"format": self.FORMAT, "identity": self.identity})]
                lines += [json.dumps({"k": k, "row": r}, ensure_ascii=False) for (k, _), r in self.rows.items()]
                write_text_atomic(self.path, "\n".join(lines) + "\n")
                self.f = open(self.path, "a", encoding="utf-8")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.f = open(self.path, "w", encoding="utf-8")
                self.f.write(json.dumps({"format": self.FORMAT, "identity": self.identity}) + "\n")
                self.f.flush()
        return self

    def done(self, k: int, plan: PairPlan) -> dict[int, dict]:
        """Rows of folder ``k`` scored before, by pair index (the same gt and pred files only)."""
        out = {}
        if not self.rows:
            return out
        for i, (g, p) in enumerate(plan):
            r = self.rows.get((k, p))
            if r is not None and r.get("gt") == g:
                out[i] = r
        return out

    def add(self, k: int, i: int, row: dict) -> None:
        import json

        from ..util.fsutil import writing

        with writing(self.path):
            self.f.write(json.dumps({"k": k, "row": row}, ensure_ascii=False) + "\n")
            self.f.flush()

    def close(self, remove: bool = False) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if remove:
            self.path.unlink(missing_ok=True)


def journal_path(outputs: Sequence[str | os.PathLike | None]) -> Path | None:
    """Where the rows of a run in progress are streamed: beside its first output file."""
    for o in outputs:
        if o:
            p = Path(o).resolve()
            return p.with_name(p.name + ".partial.jsonl")
    return None


def grid_names(cmp: Comparison, rows: int | None = None) -> list[tuple[str, str]]:
    """``(name, row label)`` of the pairs a grid shows: the first ``rows`` images, or the worst,
    median and best by PSNR gain of the last folder over the first (by PSNR with one folder)."""
    names = cmp.common_names()
    if not names:
        raise LM4LVError("no image was scored in every prediction folder: nothing to draw")
    if rows is not None:
        if rows < 1:
            raise ConfigError(f"--grid-rows must be >= 1, got {rows}")
        return [(n, n) for n in names[:rows]]
    metric = "psnr" if "psnr" in cmp.metrics else cmp.metrics[0]
    sign = 1.0 if METRICS.get(metric).higher_is_better else -1.0
    last = len(cmp.reports) - 1

    def gain(n: str) -> float:
        v = cmp.row(last, n)[metric]
        return sign * (v - cmp.row(0, n)[metric]) if last else sign * v

    order = sorted(names, key=gain)
    picks = {"worst": order[0], "median": order[(len(order) - 1) // 2], "best": order[-1]}
    out, seen = [], set()
    for which, n in picks.items():
        if n in seen:
            continue
        seen.add(n)
        # ASCII only: Pillow's default font has no Greek letters
        what = f"{metric.upper()} gain {cmp.row(last, n)[metric] - cmp.row(0, n)[metric]:+.2f}" if last else \
            f"{metric.upper()} {cmp.row(0, n)[metric]:.2f}"
        out.append((n, f"{n}\n{which}: {what}"))
    return out


def _tile(path: str) -> np.ndarray:
    from PIL import Image

    from ..image.io import load_rgb

    img = load_rgb(path)
    if max(img.size) > GRID_TILE_MAX:
        img = img.copy()
        img.thumbnail((GRID_TILE_MAX, GRID_TILE_MAX), Image.Resampling.LANCZOS)
    return np.asarray(img)


def write_grid(cmp: Comparison, path: str | os.PathLike, rows: int | None = None) -> Path:
    """A labelled grid: one column per prediction folder and the ground truth, a row per chosen
    image, the scored metrics under every prediction tile."""
    from ..image.grids import comparison_grid, grid_scale
    from ..util.fsutil import atomic_path

    picks = grid_names(cmp, rows)
    tiles, captions = [], []
    fmt = {"psnr": "PSNR {:.2f} dB", "ssim": "SSIM {:.3f}", "lpips": "LPIPS {:.3f}"}
    for name, _ in picks:
        recs = [cmp.row(k, name) for k in range(len(cmp.reports))]
        tiles.append([_tile(r["pred"]) for r in recs] + [_tile(recs[0]["gt"])])
        captions.append(["\n".join(fmt[m].format(r[m]) for m in cmp.metrics) for r in recs] + [""])
    size = max(max(t.shape[:2]) for r in tiles for t in r)
    grid = comparison_grid(tiles, [*cmp.labels, "ground truth"], [lab for _, lab in picks], captions,
                           scale=grid_scale(size))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", GRID_SOFTWARE)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return path


def _written_by_eval(path: Path, kind: str) -> bool:
    """Whether ``path`` is a file ``lm4lv eval`` wrote as ``kind`` (json | csv | grid)."""
    try:
        if kind == "grid":
            from PIL import Image

            with Image.open(path) as im:
                return im.format == "PNG" and getattr(im, "text", {}).get("Software") == GRID_SOFTWARE
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if kind == "json":
        import json

        try:
            data = json.loads(text)
        except ValueError:
            return False
        return isinstance(data, dict) and "settings" in data and ("images" in data or "predictions" in data)
    header = text.split("\n", 1)[0].split(",")
    return header[:3] == ["name", "gt", "pred"] or header[:4] == ["label", "name", "gt", "pred"]


def check_outputs(outputs: dict[str, str | os.PathLike | None], overwrite: bool = False) -> None:
    """Before anything is scored: the files ``--json`` / ``--csv`` / ``--grid`` name (``outputs``:
    option → path) must be new, or earlier outputs of ``lm4lv eval`` with ``overwrite``."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p in seen:
            raise ConfigError(f"{option} {path}: the same file as {seen[p]}")
        seen[p] = option
        if p.is_dir():
            raise ConfigError(f"{option} {path}: is a folder; give a file name")
        if not p.exists():
            continue
        if not overwrite:
            raise ConfigError(f"{option} {path}: exists; pass --overwrite to replace it, or choose another file")
        if not _written_by_eval(p, option.lstrip("-")):
            raise ConfigError(f"{option} {path}: exists and was not written by lm4lv eval; --overwrite replaces "
                              "only lm4lv's own outputs: choose another file")


def evaluate(metrics: Sequence[str] | str, gt: str | os.PathLike, preds: Sequence[str | os.PathLike], *,
             labels: Sequence[str] | None = None, json_file: str | os.PathLike | None = None,
             csv_file: str | os.PathLike | None = None, grid: str | os.PathLike | None = None,
             grid_rows: int | None = None, overwrite: bool = False, resume: bool = False,
             failures_file: str | os.PathLike | None = None, html: str | os.PathLike | None = None,
             ceiling: str | None = None, **scoring: Any) -> Comparison:
    """``lm4lv eval``: score ``preds`` against ``gt`` (``scoring``: the keyword options of
    :func:`compare_paths`) and write the requested files, which must not exist (``overwrite``:
    earlier outputs of ``lm4lv eval`` are replaced). One prediction folder is written as its own
    report, several as the comparison. ``html``: the comparison page (:mod:`lm4lv_core.report.html`);
    ``ceiling``: a run or ``FAMILY:SOURCE`` whose reconstruction of ``gt`` is scored as one more folder.

    Rows are streamed to a journal beside the first of ``--csv`` / ``--json`` as they are scored;
    ``resume`` continues an interrupted run from it (same settings only). Under
    ``on_error="skip"`` the failed pairs are written to ``failures_file`` (``path,reason``)."""
    import tempfile

    from ..report import html as page
    from . import ceiling as ceil

    metrics_list = validate_metrics(metrics)
    check_on_error(scoring.get("on_error", "stop"))
    jpath = journal_path([csv_file, json_file])
    if resume and jpath is None:
        raise ConfigError("--resume continues the scores streamed beside --csv / --json: give the same --csv or --json")
    outs = {"--json": json_file, "--csv": csv_file, "--grid": grid}
    check_outputs(outs, overwrite)
    if html:
        page.check_page_target(html, overwrite)
    with tempfile.TemporaryDirectory(prefix="lm4lv-ceiling-") as tmp:
        if ceiling:
            where = page.files_dir(html) / ceil.LABEL if html else Path(tmp)
            preds = [*preds, ceil.reconstruct_ceiling(ceiling, gt, where)]
            labels = [*(labels or default_labels(preds[:-1])), ceil.LABEL]
        journal = None
        if jpath is not None:
            identity = {"metrics": metrics_list, "gt": str(Path(gt).resolve()),
                        "preds": [str(Path(p).resolve()) for p in preds], "labels": list(labels) if labels else None,
                        **{k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in sorted(scoring.items())
                           if k in ("crop_border", "y_channel", "resize_to_smaller", "lpips_net", "lpips_weights")}}
            journal = Journal(jpath, identity, resume, overwrite)
            journal.open()
        try:
            cmp = compare_paths(metrics_list, gt, preds, labels=labels, journal=journal, **scoring)
        except Exception:  # an error: nothing is kept (an interruption keeps the journal for --resume)
            if journal is not None:
                journal.close(remove=True)
            raise
        finally:
            if journal is not None:
                journal.close()
        out = cmp.reports[0] if len(cmp.reports) == 1 else cmp
        if json_file:
            out.write_json(json_file)
        if csv_file:
            out.write_csv(csv_file)
        if grid:
            write_grid(cmp, grid, grid_rows)
        if html:
            cmp.page = page.comparison_page(html, cmp.summary(), [rep.rows for rep in cmp.reports], cmp.metrics)
    if cmp.failures and failures_file:
        write_failures(failures_file, cmp.failures)
    if journal is not None:
        journal.close(remove=True)
    return cmp


def write_failures(path: str | os.PathLike, failures: Sequence[tuple[str, str]]) -> Path:
    """``failures.csv``: one ``path,reason`` row per image that failed under ``--on-error skip``."""
    write_csv_atomic(path, ["path", "reason"], ({"path": p, "reason": r} for p, r in failures))
    return Path(path)
