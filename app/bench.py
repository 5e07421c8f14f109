"""``mcp-medsam bench``: seconds per case and precision, warm and cold, against the CPU's arithmetic floor.

Everything is measured side by side in one run:
- the machine's fp32 matmul throughput through OpenVINO (before and after the warm runs);
- warm runs: one process, every precision's graphs compiled once, each case segmented at every
  precision in turn (the order rotates from case to case: A B C, B C A, ...), so that load from
  other jobs falls on all of them alike;
- agreement of each faster precision's written labels with FP32's
  (:func:`mcp_medsam.evaluation.agreement.label_agreement`) and, with ground truth, the DSC;
- cold runs: one process per case and precision, as the challenge times it (compile cache present),
  with the peak resident memory of that process; cold - warm is the cold start;
- the same cases through the PyTorch model (when the export extra is installed);
- with ``baseline``: another model folder (the same model exported with ``--no-fold``: the crop CNN
  still in the per-box graph) at FP32 in the same rotation (rows ``base-fp32``), its agreement with
  FP32's labels, and every row's speed-up over it (``xb``).
Per case: the FLOPs of the graph calls actually made (per-graph FLOPs from each folder's manifest: what
its graphs really compute, a folded crop CNN not counted), the floor seconds (FLOPs / measured
throughput) and the ratios.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .batch import case_files, run_case
from .engine import Engine, compile_openvino, cpu_features, default_cache_dir, resolve_precision
from .manifest import Manifest, bundled_weights, load_manifest
from .segmenter import Segmenter


@dataclass
class BenchRow:
    case: str
    precision: str = "fp32"
    boxes: int = 0
    slices: int = 0
    gflops: float = 0.0
    warm_s: float = float("nan")
    graph_s: float = float("nan")  # warm: seconds inside graph calls
    cold_s: float = float("nan")
    cold_rss_mb: float = float("nan")
    torch_s: float = float("nan")
    agreement: float = float("nan")  # mean label (2D) / label-slice (3D) Dice against FP32's labels
    agreement_n: int = 0  # labels (2D) / label-slices (3D) it is the mean of
    dsc: float = float("nan")  # % against the ground truth
    status: str = "ok"


BASE = "base-fp32"  # the row label of the baseline folder, run at FP32


@dataclass
class BenchReport:
    weights: str
    precision: str  # the manifest's (how the FP32 files are stored)
    throughput_gflops: float
    precisions: list[str] = field(default_factory=list)
    cpu: str = ""
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baseline: str = ""


def matmul_throughput(n: int = 2048, repeats: int = 7) -> float:
    """fp32 GFLOP/s of an n x n by n x n MatMul through OpenVINO's CPU plugin (best of repeats)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32, name="a")
    b = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a], "matmul")
    compiled = compile_openvino(model)  # set up as the graphs it is the floor of
    req = compiled.create_infer_request()
    x = rng.standard_normal((n, n), dtype=np.float32)
    req.infer({0: x})
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        req.infer({0: x})
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def bench_precisions(manifest: Manifest, asked: list[str] | None) -> tuple[list[str], list[str]]:
    """The precisions to compare (fp32 first) and a note per one left out: ``asked``, else fp32 and
    every variant of the folder this CPU runs (bf16 needs OpenVINO's bf16 support)."""
    cpu = cpu_features()
    asked = [resolve_precision(manifest, "auto")[0] if p == "auto" else p for p in asked or manifest.variants]
    wanted = list(dict.fromkeys(["fp32", *asked]))
    out, notes = [], []
    for p in wanted:
        if p != "fp32" and p not in manifest.variants:
            notes.append(f"{p}: the model folder has no {p} variant")
        elif p == "bf16" and not cpu.has("BF16"):
            notes.append("bf16: this CPU has no bf16 support (OpenVINO); not run")
        else:
            out.append(p)
    return out, notes


def _cold_run(case: Path, weights: Path, cache_dir: Path, workdir: Path, max_batch: int,
              precision: str) -> tuple[float, float, str]:
    """One process for one case, as the challenge runs it: (seconds, peak RSS MB, status)."""
    inp = workdir / "in"
    out = workdir / "out"
    inp.mkdir(parents=True, exist_ok=True)
    for p in inp.iterdir():
        p.unlink()
    os.symlink(case.resolve(), inp / case.name)
    cmd = [sys.executable, "-m", "mcp_medsam", "predict", "-i", str(inp), "-o", str(out), "--weights", str(weights),
           "--cache-dir", str(cache_dir), "--max-batch", str(max_batch), "--precision", precision]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, cwd=workdir)
    try:
        seconds, rss_kb, rc = proc.stdout.split()[-3:]
    except ValueError:
        return float("nan"), float("nan"), f"launcher failed: {proc.stderr.strip()[-200:]}"
    return float(seconds), float(rss_kb) / 1024.0, "ok" if int(rc) == 0 else f"exit {rc}"


# Linux carries a process's peak RSS across fork+exec: a case process forked from this one (GBs of
# models) would report this process's RSS. A small fresh interpreter (~10 MB) launches and times it.
_LAUNCHER = """
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def _dsc_scorer(gts: Path | None) -> tuple[Callable[[Path, Path], float] | None, str | None]:
    """A function (gts file, segs file) -> DSC %, or None and why not."""
    if gts is None:
        return None, None
    try:
        from .evaluation.metrics import case_scores
    except ImportError as exc:
        return None, f"no DSC column: {exc.name} is missing (pip install 'mcp-medsam[eval]')"

    def score(gt_path: Path, seg_path: Path) -> float:
        with np.load(gt_path) as g, np.load(seg_path) as s:
            spacing = g["spacing"] if "spacing" in g.files else None
            return 100 * case_scores(g["gts"], s["segs"], spacing, nsd_dsc_gate=False)[0]

    return score, None


def run_bench(inputs: Path, *, weights: Path | None = None, cold: bool = True,
              torch_engine: Callable[..., Any] | None = None, threads: int | None = None, max_batch: int = 8,
              json_path: Path | None = None, precisions: list[str] | None = None,
              gts: Path | None = None, baseline: Path | None = None) -> BenchReport:
    """torch_engine: a factory ``(manifest, threads=...) -> engine`` with the Engine interface (the
    PyTorch side's TorchEngine), timed on the same cases through the same Segmenter; None: no column.
    precisions: see :func:`bench_precisions`; gts: ground truth for the DSC column (None: INPUT/../gts
    when it exists); baseline: another model folder run at FP32 beside them (rows ``base-fp32``)."""
    from .evaluation.agreement import label_agreement

    files = case_files(inputs)
    weights = Path(weights) if weights is not None else bundled_weights()
    manifest = load_manifest(weights)
    cache_dir = default_cache_dir()
    chosen, notes = bench_precisions(manifest, precisions)
    if gts is None and (Path(inputs).parent / "gts").is_dir():
        gts = Path(inputs).parent / "gts"
    score, why = _dsc_scorer(gts)
    notes += [why] if why else []
    # Row label -> (model folder, precision it runs at).
    setups = {p: (weights, manifest, p) for p in chosen}
    if baseline is not None:
        setups[BASE] = (Path(baseline), load_manifest(baseline), "fp32")
        chosen = [*chosen, BASE]
    tp_before = matmul_throughput()
    segs = {k: Segmenter(Engine(m, cache_dir=cache_dir, threads=threads, precision=p), max_batch=max_batch)
            for k, (_, m, p) in setups.items()}
    report = BenchReport(weights=str(weights), precision=manifest.precision, throughput_gflops=0.0,
                         precisions=chosen, cpu=cpu_features().summary(), notes=notes,
                         baseline=str(baseline) if baseline is not None else "")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        outs = {p: tmpd / p for p in chosen}
        for p in chosen:
            outs[p].mkdir()
            run_case(segs[p], files[0], outs[p])  # first calls allocate; not part of any case's time
        for i, f in enumerate(files):
            rows = {}
            for k in range(len(chosen)):
                p = chosen[(i + k) % len(chosen)]
                r = run_case(segs[p], f, outs[p])
                rows[p] = BenchRow(case=f.name, precision=p, boxes=r.boxes, slices=r.slices, gflops=r.gflops,
                                   warm_s=r.seconds, graph_s=r.graph_seconds, status=r.status)
            for p in chosen:
                row = rows[p]
                if row.status == "ok" and (outs[p] / f.name).is_file():
                    if p != "fp32" and rows["fp32"].status == "ok":
                        with np.load(outs["fp32"] / f.name) as a, np.load(outs[p] / f.name) as b, np.load(f) as c:
                            d = label_agreement(a["segs"], b["segs"], c["boxes"])
                            row.agreement, row.agreement_n = float(d.mean()), len(d)
                    if score is not None and (gts / f.name).is_file():
                        row.dsc = score(gts / f.name, outs[p] / f.name)
                report.rows.append(row)
        tp_after = matmul_throughput()
        report.throughput_gflops = (tp_before + tp_after) / 2
        report.notes.append(f"fp32 matmul throughput {tp_before:.0f} GFLOP/s before, {tp_after:.0f} after the "
                            "warm runs")
        if cold:
            by = {(r.case, r.precision): r for r in report.rows}
            for i, f in enumerate(files):
                for k in range(len(chosen)):
                    p = chosen[(i + k) % len(chosen)]
                    row = by[(f.name, p)]
                    row.cold_s, row.cold_rss_mb, status = _cold_run(f, setups[p][0], cache_dir, tmpd / "cold",
                                                                    max_batch, setups[p][2])
                    if status != "ok":
                        row.status = f"cold {status}"
        if torch_engine is not None:
            _torch_column(report, torch_engine, manifest, files, tmpd, threads=threads, max_batch=max_batch)
    if json_path is not None:
        from .io.atomic import write_json

        write_json(json_path, {**asdict(report), "rows": [asdict(r) for r in report.rows]})
    return report


def _torch_column(report: BenchReport, factory: Callable[..., Any], manifest: Manifest, files: list[Path],
                  tmpd: Path, *, threads: int | None, max_batch: int) -> None:
    try:
        tseg = Segmenter(factory(manifest, threads=threads), max_batch=max_batch)
    except (FileNotFoundError, RuntimeError) as exc:
        report.notes.append(f"PyTorch side skipped: {exc}")
        return
    run_case(tseg, files[0], tmpd)
    fp32 = {r.case: r for r in report.rows if r.precision == "fp32"}
    for f in files:
        fp32[f.name].torch_s = run_case(tseg, f, tmpd).seconds


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and a == a else "-"


def _num(x: float, fmt: str) -> str:
    return format(x, fmt) if x == x else "-"


def _line(r: BenchRow, tp: float, fp32_warm: float, base_warm: float = float("nan")) -> str:
    floor = r.gflops / tp
    other = 100 * (r.warm_s - r.graph_s) / r.warm_s if r.warm_s > 0 else float("nan")
    return (f"{r.case[:44]:<44} {r.precision:<9} {r.boxes:>4} {r.slices:>3} {r.gflops:>7.0f} {floor:>8.2f} "
            f"{r.warm_s:>7.2f} {_ratio(r.warm_s, floor):>5} {_ratio(fp32_warm, r.warm_s):>5} "
            f"{_ratio(base_warm, r.warm_s):>5} {other:>5.1f} "
            f"{_num(r.agreement, '.4f'):>6} {_num(r.dsc, '.2f'):>6} {r.cold_s:>7.2f} {_ratio(r.cold_s, floor):>5} "
            f"{r.cold_rss_mb:>7.0f} {r.torch_s:>8.2f} {_ratio(r.torch_s, r.warm_s):>5}"
            + ("" if r.status == "ok" else f"  [{r.status}]"))


def _total(rows: list[BenchRow], precision: str) -> BenchRow:
    def total(attr: str) -> float:
        vals = np.array([getattr(r, attr) for r in rows], dtype=float)
        return float("nan") if np.isnan(vals).all() else float(np.nansum(vals))

    def mean(attr: str) -> float:
        vals = np.array([getattr(r, attr) for r in rows], dtype=float)
        return float("nan") if np.isnan(vals).all() else float(np.nanmean(vals))

    rss = np.array([r.cold_rss_mb for r in rows], dtype=float)
    return BenchRow(case="total", precision=precision, boxes=sum(r.boxes for r in rows),
                    slices=sum(r.slices for r in rows), gflops=total("gflops"), warm_s=total("warm_s"),
                    graph_s=total("graph_s"), cold_s=total("cold_s"), torch_s=total("torch_s"),
                    agreement=mean("agreement"), dsc=mean("dsc"),
                    cold_rss_mb=float(np.nanmax(rss)) if rows and not np.isnan(rss).all() else float("nan"))


# The bars a faster precision is held to against FP32 (as mcp_medsam_torch.precision.BARS, where the
# variants are judged per box; here per label of the written segmentations).
BARS = {"2d": 0.98, "3d": 0.97, "dsc_points": 0.3}


def _bars(rows: list[BenchRow], precision: str) -> str:
    """One line: the precision's agreement (2D labels, 3D label-slices) and DSC against FP32's, and the bars."""
    own = {r.case: r for r in rows if r.precision == precision}
    ref = {r.case: r for r in rows if r.precision == "fp32"}
    parts, held = [], True
    for dim, bar in (("2D", BARS["2d"]), ("3D", BARS["3d"])):
        rs = [r for r in own.values() if r.case.startswith(f"{dim}Box") and r.agreement_n]
        if rs:
            mean = sum(r.agreement * r.agreement_n for r in rs) / sum(r.agreement_n for r in rs)
            held &= mean >= bar
            parts.append(f"{dim} {mean:.4f} (bar {bar})")
    both = [c for c in own if own[c].dsc == own[c].dsc and c in ref and ref[c].dsc == ref[c].dsc]
    if both:
        from .evaluation.evaluate import case_modality  # DSC values exist: the eval extra is installed

        def overall(by: dict[str, BenchRow]) -> float:
            mods: dict[str, list[float]] = {}
            for c in both:
                mods.setdefault(case_modality(c), []).append(by[c].dsc)
            return float(np.mean([np.mean(v) for v in mods.values()]))

        a, b = overall(own), overall(ref)
        held &= abs(a - b) <= BARS["dsc_points"]
        parts.append(f"DSC {a:.2f} vs fp32 {b:.2f} ({a - b:+.2f} points, bar {BARS['dsc_points']})")
    if not parts:
        return ""
    return f"{precision} against fp32: agreement " + ", ".join(parts) + (": holds the bars" if held else ": misses")


def format_report(rep: BenchReport) -> str:
    tp = rep.throughput_gflops
    head = (f"{'case':<44} {'prec':<9} {'box':>4} {'sl':>3} {'GFLOP':>7} {'floor s':>8} {'warm s':>7} {'w/fl':>5} "
            f"{'x32':>5} {'xb':>5} {'pp %':>5} {'agree':>6} {'DSC':>6} {'cold s':>7} {'c/fl':>5} {'RSS MB':>7} "
            f"{'torch s':>8} {'t/w':>5}")
    sep = "-" * len(head)
    precisions = rep.precisions or list(dict.fromkeys(r.precision for r in rep.rows))
    fp32 = {r.case: r.warm_s for r in rep.rows if r.precision == "fp32"}
    base = {r.case: r.warm_s for r in rep.rows if r.precision == BASE}
    nan = float("nan")
    lines = [f"CPU: {rep.cpu}",
             f"weights {rep.weights} ({rep.precision}); floor = FLOPs / {tp:.0f} GFLOP/s (fp32 matmul, OpenVINO)",
             *([f"{BASE}: {rep.baseline} at fp32"] if rep.baseline else []),
             head, sep, *(_line(r, tp, fp32.get(r.case, nan), base.get(r.case, nan)) for r in rep.rows), sep]
    totals = {p: _total([r for r in rep.rows if r.precision == p], p) for p in precisions}
    lines += [_line(t, tp, totals["fp32"].warm_s if "fp32" in totals else nan,
                    totals[BASE].warm_s if BASE in totals else nan) for t in totals.values()]
    for p, t in totals.items():
        n = sum(r.precision == p for r in rep.rows)
        if n and t.cold_s == t.cold_s:
            lines.append(f"{p}: cold start per case (cold - warm, mean) {(t.cold_s - t.warm_s) / n:.2f} s; "
                         f"peak RSS of a cold run {t.cold_rss_mb:.0f} MB")
    lines += [line for p in precisions if p != "fp32" for line in [_bars(rep.rows, p)] if line]
    lines.append("x32: FP32's warm seconds / these; xb: the baseline's (base-fp32) / these; agree: mean Dice of "
                 "each label (2D) or label-slice (3D) against "
                 "FP32's labels; DSC: % against the ground truth; pp %: share of a warm case spent outside graph calls")
    lines += [f"note: {s}" for s in rep.notes]
    return "\n".join(lines) + "\n"
