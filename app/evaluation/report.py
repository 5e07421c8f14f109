"""Evaluation report: per-modality bar charts (PNG, drawn with OpenCV) and an HTML summary.

Written by :func:`write_report` into one folder:

- ``metrics.png``: DSC and NSD (%) per modality, values on the bars, overall (mean of the
  modality means) in the title;
- ``timing.png`` (when a ``predict`` timing CSV is known): mean seconds per case by modality;
- ``report.html``: the same numbers as tables (per modality, overall, timing, problems, cases),
  with the charts embedded by relative path.

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import cv2
import numpy as np

from ..io.atomic import atomic_file, write_text
from .evaluate import EvaluationResult, TimingRow, read_timing

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (30, 30, 30)
_GREY = (150, 150, 150)
_GRID = (225, 225, 225)
# BGR: a blue and an orange that stay distinct in greyscale print.
_DSC_COLOUR = (180, 119, 31)
_NSD_COLOUR = (14, 127, 255)
_TIME_COLOUR = (44, 160, 44)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5, colour=_BLACK,
          thickness: int = 1, anchor: str = "left") -> None:
    """putText with a horizontal anchor (left, centre or right of ``org``; ``org`` y = baseline)."""
    (w, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    x = org[0] - (w // 2 if anchor == "centre" else w if anchor == "right" else 0)
    cv2.putText(img, text, (x, org[1]), _FONT, scale, colour, thickness, cv2.LINE_AA)


def _nice_step(top: float) -> float:
    """A 1/2/5 x 10^k tick step giving about five ticks up to ``top``."""
    raw = top / 5
    k = 10 ** math.floor(math.log10(raw))
    return next(m * k for m in (1, 2, 5, 10) if m * k >= raw)


def bar_chart(groups: list[str], sublabels: list[str], series: list[tuple[str, list[float], tuple[int, int, int]]],
              *, title: str, y_label: str, y_max: float | None = None, value_format: str = "{:.1f}") -> np.ndarray:
    """Grouped vertical bar chart -> (H, W, 3) uint8 BGR image.

    ``groups``: x-axis labels; ``sublabels``: a second line under each (e.g. ``n=3``);
    ``series``: (legend name, one value per group, BGR colour). NaN values draw no bar.
    ``y_max``: top of the axis (default: the largest value rounded up to a tick).
    """
    n_series = len(series)
    bar_w = 30
    # Wide enough for the bars and for the longest x label, so that labels never overlap.
    label_w = max((cv2.getTextSize(g, _FONT, 0.45, 1)[0][0] for g in groups), default=0)
    group_w = max(n_series * bar_w + 34, label_w + 14)
    left, right, top, bottom = 78, 24, 70, 74
    width = max(640, left + right + group_w * len(groups))
    height = 470
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot box; y0 is the top edge

    values = [v for _, vals, _ in series for v in vals if not math.isnan(v)]
    if y_max is None:
        peak = max(values, default=1.0) or 1.0
        step = _nice_step(peak * 1.12)
        y_max = step * math.ceil(peak * 1.12 / step)
    else:
        step = _nice_step(y_max)

    def y_of(v: float) -> int:
        return int(round(y1 - (y1 - y0) * min(v, y_max) / y_max))

    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        cv2.line(img, (x0, y), (x1, y), _GRID, 1)
        _text(img, f"{tick:g}", (x0 - 8, y + 5), 0.45, anchor="right")
        tick += step
    cv2.line(img, (x0, y0), (x0, y1), _BLACK, 1)
    cv2.line(img, (x0, y1), (x1, y1), _BLACK, 1)

    plot_w = x1 - x0
    slot = plot_w / max(len(groups), 1)
    for g, (name, sub) in enumerate(zip(groups, sublabels)):
        centre = x0 + slot * (g + 0.5)
        first = centre - n_series * bar_w / 2
        for s, (_, vals, colour) in enumerate(series):
            v = vals[g]
            if math.isnan(v):
                continue
            bx = int(round(first + s * bar_w))
            by = y_of(v)
            cv2.rectangle(img, (bx + 2, by), (bx + bar_w - 2, y1 - 1), colour, -1)
            _text(img, value_format.format(v), (bx + bar_w // 2, by - 6), 0.36, anchor="centre")
        _text(img, name, (int(centre), y1 + 20), 0.45, anchor="centre")
        _text(img, sub, (int(centre), y1 + 38), 0.4, _GREY, anchor="centre")

    _text(img, title, (width // 2, 28), 0.6, thickness=2, anchor="centre")

    # Legend, top right, above the plot box.
    lx = x1
    for name, _, colour in reversed(series):
        (tw, _), _ = cv2.getTextSize(name, _FONT, 0.45, 1)
        lx -= tw + 26
        cv2.rectangle(img, (lx, top - 26), (lx + 14, top - 12), colour, -1)
        _text(img, name, (lx + 19, top - 14), 0.45)
        lx -= 14

    # The y-axis label, drawn on its own strip and turned upright.
    (tw, th), base = cv2.getTextSize(y_label, _FONT, 0.5, 1)
    strip = np.full((th + base + 6, tw + 6, 3), 255, dtype=np.uint8)
    cv2.putText(strip, y_label, (3, th + 3), _FONT, 0.5, _BLACK, 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    sy = max(0, (y0 + y1) // 2 - strip.shape[0] // 2)
    sh = min(strip.shape[0], height - sy)
    img[sy:sy + sh, 6:6 + strip.shape[1]] = strip[:sh]
    return img


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    with atomic_file(path, "wb") as f:
        f.write(buf.tobytes())


def metrics_chart(result: EvaluationResult) -> np.ndarray:
    """Per-modality DSC / NSD (%) bar chart of an evaluation."""
    mods = result.modalities
    title = (f"Overall (mean of {len(mods)} modality means): DSC {100 * result.dsc:.2f}%, "
             f"NSD {100 * result.nsd:.2f}%")
    return bar_chart([m.modality for m in mods], [f"n={m.n}" for m in mods],
                     [("DSC", [100 * m.dsc for m in mods], _DSC_COLOUR),
                      (f"NSD ({result.tolerance:g} mm)", [100 * m.nsd for m in mods], _NSD_COLOUR)],
                     title=title, y_label="score (%)", y_max=100.0)


def timing_chart(timing: list[TimingRow]) -> np.ndarray:
    """Mean seconds per case by modality."""
    total = sum(t.total_s for t in timing)
    n = sum(t.n for t in timing)
    failed = sum(t.failed for t in timing)
    title = f"Seconds per case by modality ({n} cases, {total:.1f} s in all" + (
        f"; {failed} failed, not timed)" if failed else ")")
    return bar_chart([t.modality for t in timing], [f"n={t.n}" for t in timing],
                     [("mean s/case", [t.mean_s for t in timing], _TIME_COLOUR)],
                     title=title,
                     y_label="seconds per case", value_format="{:.2f}")


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f'<{tag}{" class=num" if i >= numeric_from else ""}>{html.escape(c)}</{tag}>'
                       for i, c in enumerate(row))
    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table>\n<tr>{cells('th', header)}</tr>\n{body}\n</table>"


def _html(result: EvaluationResult, timing: list[TimingRow]) -> str:
    pct = "{:.2f}".format
    gate = "NSD counted as 0 where the case DSC &le; 0.2" if result.nsd_dsc_gate else "no DSC gate on NSD"
    mod_rows = [[m.modality, str(m.n), pct(100 * m.dsc), pct(100 * m.nsd)] for m in result.modalities]
    mod_rows.append([f"overall (mean of {len(result.modalities)} modality means)", str(len(result.cases)),
                     pct(100 * result.dsc), pct(100 * result.nsd)])
    mod_rows.append(["std across modalities", "", pct(100 * result.dsc_std), pct(100 * result.nsd_std)])
    mod_rows.append(["mean over cases", str(len(result.cases)), pct(100 * result.case_mean_dsc),
                     pct(100 * result.case_mean_nsd)])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>MCP-MedSAM evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}.num{text-align:right}"
        "img{max-width:100%}</style>",
        "</head><body>", "<h1>MCP-MedSAM evaluation</h1>",
        f"<p>CVPR 2024 MedSAM-on-Laptop metrics: DSC and NSD at {result.tolerance:g} mm; {gate}. "
        "Scores in %.</p>",
        '<img src="metrics.png" alt="DSC and NSD per modality">',
        "<h2>Per modality</h2>", _table(["modality", "n", "DSC %", "NSD %"], mod_rows),
    ]
    if timing:
        parts += ["<h2>Seconds per case</h2>", '<img src="timing.png" alt="seconds per case by modality">']
        parts.append(_table(["modality", "n", "mean s", "median s", "max s", "total s", "failed"],
                            [[t.modality, str(t.n), f"{t.mean_s:.2f}", f"{t.median_s:.2f}", f"{t.max_s:.2f}",
                              f"{t.total_s:.1f}", str(t.failed)] for t in timing]))
    parts.append("<h2>Problems</h2>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in result.problems) + "</ul>"
                 if result.problems else "<p>none</p>")
    parts += ["<h2>Cases</h2>",
              _table(["case", "modality", "DSC %", "NSD %", "status"],
                     [[c.case, c.modality, pct(100 * c.dsc), pct(100 * c.nsd), c.status] for c in result.cases],
                     numeric_from=2),
              "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(result: EvaluationResult, report_dir: Path, timing_csv: Path | None = None) -> list[Path]:
    """Write ``metrics.png``, ``timing.png`` (with timing) and ``report.html`` into ``report_dir``.

    Timing comes from ``timing_csv`` when given, else from ``result.timing``. Returns the paths written.
    """
    report_dir = Path(report_dir)
    timing = read_timing(Path(timing_csv)) if timing_csv is not None else result.timing
    written = [report_dir / "metrics.png"]
    _write_png(written[0], metrics_chart(result))
    if timing:
        written.append(report_dir / "timing.png")
        _write_png(written[-1], timing_chart(timing))
    written.append(report_dir / "report.html")
    write_text(written[-1], _html(result, timing))
    return written
