"""``report.html`` of a training run: the loss curves (an inline SVG drawn from ``metrics.csv``)
and the preview grids by step (``previews/step-N.png``), a static page with no network."""

from __future__ import annotations

import csv
import html
import math
import os
import re
from pathlib import Path

from ..util.fsutil import write_text_atomic

REPORT = "report.html"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _svg(steps: list[int], series: dict[str, list[float]], width: int = 720, height: int = 300) -> str:
    pad_l, pad_b, pad_t, pad_r = 60, 30, 10, 10
    vals = [v for ys in series.values() for v in ys if math.isfinite(v)]
    if not steps or not vals:
        return "<p>no losses logged yet</p>"
    log = min(vals) > 0
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = f(min(vals)), f(max(vals))
    hi = hi if hi > lo else lo + 1
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(s: int, v: float) -> str:
        x = pad_l + (s - s0) / (s1 - s0) * (width - pad_l - pad_r)
        y = pad_t + (1 - (f(v) - lo) / (hi - lo)) * (height - pad_t - pad_b)
        return f"{x:.1f},{y:.1f}"

    out = [f'<svg id="loss" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'style="background:#fff;border:1px solid #ccc">']
    for k in range(5):  # y ticks
        t = lo + (hi - lo) * k / 4
        y = pad_t + (1 - k / 4) * (height - pad_t - pad_b)
        label = f"{10 ** t:.3g}" if log else f"{t:.3g}"
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{pad_l - 4}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    out.append(f'<text x="{pad_l}" y="{height - 8}" font-size="11">step {s0}</text>'
               f'<text x="{width - pad_r}" y="{height - 8}" font-size="11" text-anchor="end">step {s1}</text>')
    for i, (name, ys) in enumerate(series.items()):
        pts = " ".join(xy(s, v) for s, v in zip(steps, ys) if math.isfinite(v) and (v > 0 or not log))
        c = COLOURS[i % len(COLOURS)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.3" points="{pts}"><title>{html.escape(name)}</title></polyline>'
                   f'<text x="{width - pad_r - 4}" y="{pad_t + 14 * (i + 1)}" font-size="12" text-anchor="end" fill="{c}">'
                   f'{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def write_run_report(run_dir: str | os.PathLike, metrics_csv: str = "metrics.csv") -> Path:
    """Write ``run_dir/report.html`` from what the run has logged so far."""
    run_dir = Path(run_dir)
    steps, series = [], {}
    path = run_dir / metrics_csv
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        cols = [c for c in (rows[0] if rows else {}) if c.endswith("loss")]
        for c in cols:
            ys = [float(r[c]) if r.get(c) not in (None, "") else float("nan") for r in rows]
            if c == "loss" or any(y != 0 for y in ys if math.isfinite(y)):
                series[c] = ys
        steps = [int(r["step"]) for r in rows]
    previews = sorted(((int(m.group(1)), p) for p in (run_dir / "previews").glob("step-*.png")
                       if (m := re.fullmatch(r"step-(\d+)\.png", p.name))), key=lambda t: t[0])
    parts = [f"<h1>lm4lv training run: {html.escape(run_dir.name)}</h1>",
             "<h2>Loss</h2>", _svg(steps, series),
             f"<p class='muted'>{len(steps)} logged steps from {metrics_csv}"
             + (" (log scale)" if series and all(min((v for v in ys if math.isfinite(v)), default=1) > 0
                                                 for ys in series.values()) else "") + "</p>",
             "<h2>Previews by step</h2>"]
    if previews:
        opts = "".join(f'<option value="{i}">step {s}</option>' for i, (s, _) in enumerate(previews))
        imgs = "".join(f'<figure data-step="{s}"{"" if i == len(previews) - 1 else " hidden"}><img src="previews/{p.name}" '
                       f'alt="preview at step {s}" loading="lazy"><figcaption>step {s}</figcaption></figure>'
                       for i, (s, p) in enumerate(previews))
        parts += [f'<p><input type="range" id="pstep" min="0" max="{len(previews) - 1}" value="{len(previews) - 1}"> '
                  f'<select id="psel">{opts}</select> (<kbd>←</kbd>/<kbd>→</kbd>)</p><div id="previews">{imgs}</div>',
                  """<script>(function(){var r=document.getElementById('pstep'),s=document.getElementById('psel'),
f=document.querySelectorAll('#previews figure');function go(i){i=Math.max(0,Math.min(f.length-1,i));
f.forEach(function(x,k){x.hidden=k!==i;});r.value=s.value=String(i);}
r.oninput=function(){go(+r.value);};s.onchange=function(){go(+s.value);};s.value=r.value;
document.addEventListener('keydown',function(e){if(e.key==='ArrowLeft')go(+r.value-1);if(e.key==='ArrowRight')go(+r.value+1);});})();</script>"""]
    else:
        parts.append("<p>no preview grids yet</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>lm4lv run "
            f"{html.escape(run_dir.name)}</title><style>body{{font:14px system-ui,sans-serif;margin:16px}}"
            ".muted{color:#777}#previews img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}</style></head><body>"
            + "".join(parts) + "</body></html>")
    out = run_dir / REPORT
    write_text_atomic(out, page)
    return out
