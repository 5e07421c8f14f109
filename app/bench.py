"""``mcp-medsam bench``: seconds per case, warm and cold, against the CPU's arithmetic floor.

Everything is measured side by side in one run:
- the machine's fp32 matmul throughput through OpenVINO (before and after the warm runs);
- warm runs: one process, graphs compiled once, each case segmented in turn;
- cold runs: one process per case, as the challenge times it (compile cache present), with the
  peak resident memory of that process;
- the same cases through the PyTorch model (when the export extra is installed).
Per case: the FLOPs of the graph calls actually made (per-graph FLOPs from the manifest), the floor
seconds (FLOPs / measured throughput) and the ratios.
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
from .engine import Engine, default_cache_dir
from .manifest import Manifest, bundled_weights, load_manifest
from .segmenter import Segmenter


@dataclass
class BenchRow:
    case: str
    boxes: int = 0
    slices: int = 0
    gflops: float = 0.0
    warm_s: float = float("nan")
    graph_s: float = float("nan")  # warm: seconds inside graph calls
    cold_s: float = float("nan")
    cold_rss_mb: float = float("nan")
    torch_s: float = float("nan")
    status: str = "ok"


@dataclass
class BenchReport:
    weights: str
    precision: str
    throughput_gflops: float
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def matmul_throughput(n: int = 2048, repeats: int = 7) -> float:
    """fp32 GFLOP/s of an n x n by n x n MatMul through OpenVINO's CPU plugin (best of repeats)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32, name="a")
    b = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a], "matmul")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    x = rng.standard_normal((n, n), dtype=np.float32)
    req.infer({0: x})
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        req.infer({0: x})
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def _cold_run(case: Path, weights: Path, cache_dir: Path, workdir: Path, max_batch: int) -> tuple[float, float, str]:
    """One process for one case, as the challenge runs it: (seconds, peak RSS MB, status)."""
    inp = workdir / "in"
    out = workdir / "out"
    inp.mkdir(parents=True, exist_ok=True)
    for p in inp.iterdir():
        p.unlink()
    os.symlink(case.resolve(), inp / case.name)
    cmd = [sys.executable, "-m", "mcp_medsam", "predict", "-i", str(inp), "-o", str(out), "--weights", str(weights),
           "--cache-dir", str(cache_dir), "--max-batch", str(max_batch)]
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


def run_bench(inputs: Path, *, weights: Path | None = None, cold: bool = True,
              torch_engine: Callable[..., Any] | None = None, threads: int | None = None, max_batch: int = 8,
              json_path: Path | None = None) -> BenchReport:
    """torch_engine: a factory ``(manifest, threads=...) -> engine`` with the Engine interface (the
    PyTorch side's TorchEngine), timed on the same cases through the same Segmenter; None: no column."""
    files = case_files(inputs)
    weights = Path(weights) if weights is not None else bundled_weights()
    manifest = load_manifest(weights)
    cache_dir = default_cache_dir()
    tp_before = matmul_throughput()
    segmenter = Segmenter(Engine(manifest, cache_dir=cache_dir, threads=threads), max_batch=max_batch)
    report = BenchReport(weights=str(weights), precision=manifest.precision, throughput_gflops=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        run_case(segmenter, files[0], tmpd)  # first calls allocate; not part of any case's time
        for f in files:
            r = run_case(segmenter, f, tmpd)
            report.rows.append(BenchRow(case=f.name, boxes=r.boxes, slices=r.slices, gflops=r.gflops,
                                        warm_s=r.seconds, graph_s=r.graph_seconds, status=r.status))
        tp_after = matmul_throughput()
        report.throughput_gflops = (tp_before + tp_after) / 2
        report.notes.append(f"fp32 matmul throughput {tp_before:.0f} GFLOP/s before, {tp_after:.0f} after the "
                            "warm runs")
        if cold:
            for row, f in zip(report.rows, files):
                row.cold_s, row.cold_rss_mb, status = _cold_run(f, weights, cache_dir, tmpd / "cold", max_batch)
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
    for row, f in zip(report.rows, files):
        row.torch_s = run_case(tseg, f, tmpd).seconds


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and a == a else "-"


def _line(r: BenchRow, tp: float) -> str:
    floor = r.gflops / tp
    other = 100 * (r.warm_s - r.graph_s) / r.warm_s if r.warm_s > 0 else float("nan")
    return (f"{r.case[:52]:<52} {r.boxes:>4} {r.slices:>3} {r.gflops:>7.0f} {floor:>8.2f} {r.warm_s:>7.2f} "
            f"{_ratio(r.warm_s, floor):>5} {other:>5.1f} {r.cold_s:>7.2f} {_ratio(r.cold_s, floor):>5} "
            f"{r.cold_rss_mb:>7.0f} "
            f"{r.torch_s:>8.2f} {_ratio(r.torch_s, r.warm_s):>5}" + ("" if r.status == "ok" else f"  [{r.status}]"))


def format_report(rep: BenchReport) -> str:
    tp = rep.throughput_gflops
    head = (f"{'case':<52} {'box':>4} {'sl':>3} {'GFLOP':>7} {'floor s':>8} {'warm s':>7} {'w/fl':>5} {'pp %':>5} "
            f"{'cold s':>7} {'c/fl':>5} {'RSS MB':>7} {'torch s':>8} {'t/w':>5}")
    rows = rep.rows

    def total(attr: str) -> float:
        vals = np.array([getattr(r, attr) for r in rows], dtype=float)
        return float("nan") if np.isnan(vals).all() else float(np.nansum(vals))

    tot = BenchRow(case="total", boxes=sum(r.boxes for r in rows), slices=sum(r.slices for r in rows),
                   gflops=total("gflops"), warm_s=total("warm_s"), graph_s=total("graph_s"), cold_s=total("cold_s"),
                   torch_s=total("torch_s"),
                   cold_rss_mb=float(np.nanmax([r.cold_rss_mb for r in rows])) if rows and not
                   np.isnan([r.cold_rss_mb for r in rows]).all() else float("nan"))
    sep = "-" * len(head)
    lines = [f"weights {rep.weights} ({rep.precision}); floor = FLOPs / {tp:.0f} GFLOP/s (fp32 matmul, OpenVINO)",
             head, sep, *(_line(r, tp) for r in rows), sep, _line(tot, tp)]
    if rows and tot.cold_s == tot.cold_s:
        lines.append(f"cold overhead per case (cold - warm, mean): {(tot.cold_s - tot.warm_s) / len(rows):.2f} s; "
                     f"peak RSS of a cold run: {tot.cold_rss_mb:.0f} MB")
    lines.append("pp %: share of a warm case spent outside graph calls (reading, pre/post-processing, writing)")
    lines += [f"note: {s}" for s in rep.notes]
    return "\n".join(lines) + "\n"
