"""``mcp-medsam bench-throughput``: cases per minute of the ways to spread a folder (a benchmark, not a test).

In one run, on the same cases, one after another, each through the real command line (fresh
processes: model loads and cluster start-up are part of the wall time, as they are for a user):

1. one process, one inference thread (the per-core reference);
2. one process, all cores (``predict`` as it is);
3. ``--num-parts P`` side by side: P processes of one thread each, started together;
4. ``--dask local:W``: a LocalCluster of W single-threaded workers.

The compiled-model cache is filled first (``mcp-medsam warmup``), so no mode pays for compiling.
Reported: wall seconds, CPU seconds (how many cores were busy on average), each process's own
wall seconds (how even the parts were), cases per minute and the ratio to mode 1, whether every
mode's labels equal mode 1's (bit for bit), the CPU model and the load average before and after.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .batch import case_files
from .errors import InputError
from .serve.loadcheck import _cpu_model


@dataclass
class Mode:
    name: str
    processes: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system time of its processes (and their workers)
    process_seconds: list[float] = field(default_factory=list)  # wall seconds of each process
    ok: int = 0
    identical: int = 0  # cases whose labels equal the reference mode's
    message: str = ""

    def per_minute(self, cases: int) -> float:
        return 60.0 * cases / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ThroughputReport:
    cpu: str
    cores: int
    cases: list[str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    modes: list[Mode] = field(default_factory=list)


def pick_cases(files: list[Path], count: int | None) -> list[Path]:
    """``count`` cases spread evenly over the sorted list (so 2D and 3D both stay in), or all of them."""
    if count is None or count >= len(files):
        return list(files)
    if count < 1:
        raise InputError(f"--cases {count} must be 1 or more")
    return [files[(i * len(files)) // count] for i in range(count)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcp_medsam", *args]


def _cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_together(mode: Mode, commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start every command at once and wait for all; sets the mode's wall, CPU and per-process seconds."""
    cpu0, t0 = _cpu_of_children(), time.perf_counter()
    done: list[subprocess.CompletedProcess | None] = [None] * len(commands)
    ends = [0.0] * len(commands)

    def wait(i: int, p: subprocess.Popen) -> None:
        out, err = p.communicate()
        ends[i] = time.perf_counter() - t0
        done[i] = subprocess.CompletedProcess(commands[i], p.returncode, out, err)

    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    waiters = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(procs)]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    mode.seconds, mode.cpu_seconds, mode.process_seconds = time.perf_counter() - t0, _cpu_of_children() - cpu0, ends
    return [d for d in done if d is not None]


def _labels(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        try:
            with np.load(folder / n) as d:
                out[n] = d["segs"]
        except (OSError, KeyError, ValueError):
            pass
    return out


def run_throughput(inputs: Path, *, cases: int | None = None, weights: Path | None = None, parts: int = 2,
                   workers: int = 2, dask: bool = True, json_path: Path | None = None) -> ThroughputReport:
    """Run the modes on ``cases`` of ``inputs`` (default: all) and return their figures."""
    files = pick_cases(case_files(inputs), cases)
    common = ["--weights", str(weights)] if weights is not None else []
    report = ThroughputReport(cpu=_cpu_model(), cores=os.cpu_count() or 1, cases=[p.name for p in files],
                              load_before=os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="mcp-medsam-throughput-") as tmp:
        work = Path(tmp)
        subset = work / "inputs"
        subset.mkdir()
        for p in files:
            (subset / p.name).symlink_to(p.resolve())
        warm = subprocess.run(_cli("warmup", *common), capture_output=True, text=True)
        if warm.returncode != 0:
            raise InputError(f"warmup failed: {warm.stderr.strip()[-300:]}")
        plans: list[tuple[Mode, list[list[str]]]] = [
            (Mode("1 process, 1 thread", 1), [_cli("predict", "-i", str(subset), "-o", str(work / "m0"),
                                                    "--threads", "1", *common)]),
            (Mode("1 process, all cores", 1), [_cli("predict", "-i", str(subset), "-o", str(work / "m1"), *common)]),
            (Mode(f"--num-parts {parts}: {parts} processes x 1 thread", parts),
             [_cli("predict", "-i", str(subset), "-o", str(work / "m2"), "--threads", "1", "--num-parts",
                   str(parts), "--part-id", str(i), *common) for i in range(parts)]),
        ]
        if dask:
            plans.append((Mode(f"--dask local:{workers}: {workers} workers x 1 thread", workers),
                          [_cli("predict", "-i", str(subset), "-o", str(work / "m3"), "--dask", f"local:{workers}",
                                *common)]))
        reference: dict[str, np.ndarray] = {}
        for k, (mode, commands) in enumerate(plans):
            out = Path(commands[0][commands[0].index("-o") + 1])
            procs = _run_together(mode, commands)
            bad = [p for p in procs if p.returncode not in (0, 1)]
            if bad:
                mode.message = f"exit {bad[0].returncode}: {bad[0].stderr.strip()[-200:]}"
            labels = _labels(out, report.cases)
            mode.ok = len(labels)
            if k == 0:
                reference = labels
            mode.identical = sum(1 for n, a in labels.items() if n in reference and a.dtype == reference[n].dtype
                                 and np.array_equal(a, reference[n]))
            report.modes.append(mode)
    report.load_after = os.getloadavg()
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(report), indent=1) + "\n")
    return report


def format_report(report: ThroughputReport) -> str:
    n = len(report.cases)
    lines = [f"CPU: {report.cpu} ({report.cores} cores); {n} cases; load average before "
             f"{report.load_before[0]:.2f}, after {report.load_after[0]:.2f}",
             f"{'mode':<44} {'wall s':>8} {'CPU s':>8} {'busy':>5} {'cases/min':>10} {'vs 1 thread':>12} "
             f"{'labels = 1 thread':>18}  each process, wall s"]
    base = report.modes[0].per_minute(n) if report.modes else 0.0
    for m in report.modes:
        rate = m.per_minute(n)
        busy = m.cpu_seconds / m.seconds if m.seconds else 0.0
        lines.append(f"{m.name:<44} {m.seconds:>8.1f} {m.cpu_seconds:>8.1f} {busy:>5.2f} {rate:>10.2f} "
                     f"{rate / base if base else 0:>11.2f}x {m.identical:>15}/{n}  "
                     f"{', '.join(f'{s:.1f}' for s in m.process_seconds)}" + (f"  ({m.message})" if m.message else ""))
    parts = [m for m in report.modes if m.name.startswith("--num-parts")]
    if parts and base:
        p = parts[0]
        per_core = p.per_minute(n) / p.processes
        lines.append(f"Per core with parts: {per_core:.2f} cases/min ({per_core / base:.2f} of one process alone). "
                     f"Parts share nothing but the file system, so N machines of c cores running c one-thread "
                     f"parts each should give about N x c x {per_core:.2f} cases/min, while storage keeps up.")
    return "\n".join(lines) + "\n"
