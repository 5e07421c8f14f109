"""Evaluation report: per-modality bar charts (PNG, drawn with matplotlib) and an HTML summary.

Written by :func:`write_report` into one folder:

- ``metrics.png``: DSC and NSD (%) per modality, values on the bars, overall (mean of the
  modality means) in the title;
- ``timing.png`` (when a ``predict`` timing CSV is known): mean seconds per case by modality;
- ``report.html``: the same numbers as tables (per modality, overall, timing, problems, cases),
  with the charts embedded by relative path.

Every file is written atomically (temporary file + rename). matplotlib (the ``eval`` extra) is used
through its object API with the Agg canvas: no pyplot, no global backend state.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io.atomic import atomic_file, write_text
from .evaluate import EvaluationResult, TimingRow, read_timing

# matplotlib's default cycle: a blue and an orange that stay distinct in greyscale print.
_DSC_COLOUR, _NSD_COLOUR, _TIME_COLOUR = "tab:blue", "tab:orange", "tab:green"
DPI = 100


def bar_chart(groups: list[str], sublabels: list[str], series: list[tuple[str, list[float], str]], *, title: str,
              y_label: str, y_max: float | None = None, value_format: str = "{:.1f}") -> Figure:
    """Grouped vertical bar chart.

    ``groups``: x-axis labels; ``sublabels``: a second line under each (e.g. ``n=3``);
    ``series``: (legend name, one value per group, matplotlib colour). NaN values draw no bar.
    ``y_max``: top of the axis (default: 12 % above the largest value, 25 % with a legend). At least 640 x 470 pixels,
    wider with many groups so that labels never overlap.
    """
    # Each group as wide as its bars and its longest label need (about 0.08 inch per character).
    group_w = max(0.35 * max(len(series), 2), 0.08 * max((len(g) for g in groups), default=0) + 0.2)
    fig = Figure(figsize=(max(6.4, 1.2 + group_w * len(groups)), 4.7), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = len(series)
    bar_w = 0.8 / max(n, 1)
    xs = list(range(len(groups)))
    for s, (name, values, colour) in enumerate(series):
        pos = [x - 0.4 + bar_w * (s + 0.5) for x in xs]
        heights = [0.0 if math.isnan(v) else v for v in values]
        bars = ax.bar(pos, heights, bar_w * 0.9, label=name, color=colour)
        ax.bar_label(bars, labels=["" if math.isnan(v) else value_format.format(v) for v in values],
                     padding=2, fontsize=8)
    ax.set_xticks(xs, [f"{g}\n{sub}" for g, sub in zip(groups, sublabels)], fontsize=9)
    values = [v for _, vals, _ in series for v in vals if not math.isnan(v)]
    ax.set_ylim(0, y_max if y_max is not None else (1.25 if n > 1 else 1.12) * (max(values, default=1.0) or 1.0))
    ax.set_ylabel(y_label)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    if n > 1:  # one series is named by the y label; several share the headroom above the bars
        ax.legend(loc="upper center", ncols=n, fontsize=9, frameon=False)
    return fig


def _write_png(path: Path, fig: Figure) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def metrics_chart(result: EvaluationResult) -> Figure:
    """Per-modality DSC / NSD (%) bar chart of an evaluation."""
    mods = result.modalities
    title = (f"Overall (mean of {len(mods)} modality means): DSC {100 * result.dsc:.2f}%, "
             f"NSD {100 * result.nsd:.2f}%")
    return bar_chart([m.modality for m in mods], [f"n={m.n}" for m in mods],
                     [("DSC", [100 * m.dsc for m in mods], _DSC_COLOUR),
                      (f"NSD ({result.tolerance:g} mm)", [100 * m.nsd for m in mods], _NSD_COLOUR)],
                     title=title, y_label="score (%)", y_max=115.0)  # 100 % and the legend above it


def timing_chart(timing: list[TimingRow]) -> Figure:
    """Mean seconds per case by modality."""
    total = sum(t.total_s for t in timing)
    n = sum(t.n for t in timing)
    failed = sum(t.failed for t in timing)
    title = f"Seconds per case by modality ({n} cases, {total:.1f} s in all" + (
        f"; {failed} failed, not timed)" if failed else ")")
    return bar_chart([t.modality for t in timing], [f"n={t.n}" for t in timing],
                     [("mean s/case", [t.mean_s for t in timing], _TIME_COLOUR)],
                     title=title, y_label="seconds per case", value_format="{:.2f}")


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
