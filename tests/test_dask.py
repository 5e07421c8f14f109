"""Issue 15: ``predict --dask`` on a real (local, process-based) Dask cluster, through the real CLI.

- ``--dask local:2`` gives labels bit-identical to a single-process run of the same folder (one
  inference thread each: the same arithmetic), a failing case is a failed row, and a resume over
  the cluster keeps every finished output;
- a worker process killed (SIGKILL) while it holds a case: every case is still written exactly
  once, whole, with the same labels, and the timing CSV has exactly one row per case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli, segs_of
from conftest import csv_rows as timing_rows
from mcp_medsam.cluster import DaskTarget, parse_dask
from mcp_medsam.errors import UsageError

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")

RNG = np.random.default_rng(8786)
SLOW = ("3DBox_CT_slow0.npz", "3DBox_CT_slow1.npz")


def write(folder: Path, name: str, **arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / name, **arrays)






def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Small 2D and 3D cases, one broken file, and two slow volumes (seconds each on the tiny model)."""
    d = tmp_path_factory.mktemp("in")
    img = RNG.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    vol = RNG.integers(0, 256, (12, 40, 50), dtype=np.uint8)
    for i in range(4):
        write(d, f"2DBox_CT_{i}.npz", imgs=np.roll(img, 9 * i, axis=0),
              boxes=np.array([[10, 10, 60, 50], [30, 5, 110, 80]]))
    write(d, "3DBox_MR_small.npz", imgs=vol, boxes=np.array([[5, 5, 2, 30, 30, 9]]))
    big = RNG.integers(0, 256, (160, 256, 256), dtype=np.uint8)
    for k, name in enumerate(SLOW):
        write(d, name, imgs=np.roll(big, 31 * k, axis=2), boxes=np.array([[5, 5, 0, 200, 200, 159],
                                                                         [20, 20, 5, 120, 150, 150]]))
    (d / "2DBox_CT_broken.npz").write_bytes(b"not a zip archive")
    return d


@pytest.fixture(scope="module")
def reference(inputs, tiny_export, tmp_path_factory) -> dict[str, np.ndarray]:
    """One process, one inference thread (as each Dask worker here)."""
    out = tmp_path_factory.mktemp("ref")
    proc = run_cli("predict", "-i", str(inputs), "-o", str(out), "--weights", str(tiny_export), "--threads", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # the broken case
    return segs_of(out)


def test_parse_dask():
    assert parse_dask("local:2") == DaskTarget(workers=2)
    assert parse_dask("tcp://10.1.2.3:8786") == DaskTarget(address="tcp://10.1.2.3:8786")
    assert parse_dask("tls://scheduler:8786").address == "tls://scheduler:8786"
    for spec, message in (("local:0", "N >= 1"), ("local:", "N >= 1"), ("tcp://host", "needs its port"),
                          ("nowhere.json", "no scheduler file"), ("8786", "expected local:N")):
        with pytest.raises(UsageError, match=message):
            parse_dask(spec)


def test_local_cluster_is_bit_identical_to_one_process(inputs, tiny_export, reference, tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = run_cli("predict", "-i", str(inputs), "-o", str(out), "--weights", str(tiny_export), "--dask", "local:2")
    elapsed = time.perf_counter() - t0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr  # the broken case is a failed row, not a failed run
    assert "8 cases: 7 segmented, 0 kept from an earlier run, 1 failed in " in proc.stderr
    assert same(segs_of(out), reference)
    rows = timing_rows(out / "timing.csv")
    # The closing line gives the run's wall time: within the process's life, at least the longest case
    # (the workers' per-case seconds overlap, so their sum is no wall time).
    wall = float(proc.stderr.split(" failed in ")[1].split(" s wall time")[0])
    assert max(float(r["seconds"]) for r in rows) <= wall <= elapsed, (wall, elapsed)
    assert sorted(r["case"] for r in rows) == sorted(p.name for p in inputs.glob("*.npz"))
    by = {r["case"]: r for r in rows}
    broken = by["2DBox_CT_broken.npz"]
    assert broken["status"] == "failed" and "not a readable .npz" in broken["message"]
    assert [ln for ln in proc.stderr.splitlines() if ": failed: " in ln] == \
        [f"2DBox_CT_broken.npz: failed: {by['2DBox_CT_broken.npz']['message']}"]
    assert by[SLOW[0]]["slices"] == "160" and by["2DBox_CT_0.npz"]["boxes"] == "2"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # Resume over the cluster: one output damaged; the rest are kept (not written again).
    (out / "2DBox_CT_1.npz").write_bytes((out / "2DBox_CT_1.npz").read_bytes()[:50])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name != "2DBox_CT_1.npz"}
    proc = run_cli("predict", "-i", str(inputs), "-o", str(out), "--weights", str(tiny_export), "--dask", "local:2",
                   "--skip-existing")
    assert proc.returncode == 1, proc.stderr
    assert "8 cases: 1 segmented, 6 kept from an earlier run, 1 failed" in proc.stderr, proc.stderr
    by = {r["case"]: r for r in timing_rows(out / "timing.csv")}
    assert by["2DBox_CT_1.npz"]["status"] == "ok" and "unreadable" in by["2DBox_CT_1.npz"]["message"]
    assert all(by[n]["status"] == "skipped" for n in mtimes)
    assert all((out / n).stat().st_mtime_ns == t for n, t in mtimes.items())
    assert same(segs_of(out), reference)


def test_bad_model_is_one_line_before_any_case(inputs, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    proc = run_cli("predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "--weights", str(weights),
                   "--dask", "local:1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no manifest.json" in errors[0]
    assert not list((tmp_path / "out").glob("*.npz"))


def _processing(client) -> dict[str, list[str]]:
    return {w: [str(k) for k in keys] for w, keys in client.processing().items()}


def test_a_killed_worker_has_its_case_rerun_elsewhere_written_once(inputs, tiny_export, reference, tmp_path):
    """A process-based LocalCluster of two workers (nannies restart a killed one); the run joins it by
    address. Once an output exists, the worker holding a slow case is killed with SIGKILL."""
    from distributed import Client, LocalCluster

    out = tmp_path / "out"
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "predict", "-i", str(inputs), "-o", str(out),
                                 "--weights", str(tiny_export), "--dask", cluster.scheduler_address], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        pids = client.run(os.getpid)  # {worker address: pid}, asked before the moment to kill
        victim, held = None, []
        deadline = time.monotonic() + 300
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            if list(out.glob("*.npz")):
                for worker, keys in _processing(client).items():
                    held = [k.rsplit(":", 1)[-1] for k in keys if k.endswith(SLOW)]
                    if held:
                        victim = worker
                        break
            time.sleep(0.01)  # polling for the moment to kill, not a timing assertion
        assert victim is not None, "no worker was seen holding a slow case"
        pid = pids[victim]
        os.kill(pid, signal.SIGKILL)
        while True:  # the killed process is gone before its outputs are looked at
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        unwritten = [c for c in held if not (out / c).exists()]
        _, stderr = proc.communicate(timeout=600)
    finally:
        client.close()
        cluster.close()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 1, stderr  # only the broken case failed
    rows = timing_rows(out / "timing.csv")
    names = sorted(p.name for p in inputs.glob("*.npz"))
    assert sorted(r["case"] for r in rows) == names  # exactly one row per case
    assert all(r["status"] == "ok" for r in rows if r["case"] != "2DBox_CT_broken.npz"), rows
    # Every output whole and as one process writes it, the rerun cases included; no temp file left.
    assert same(segs_of(out), reference)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert set(unwritten) <= set(reference)  # the killed worker's unfinished case(s) were redone elsewhere


def test_throughput_benchmark_runs_every_mode_on_the_same_labels(tiny_export, tmp_path):
    """The benchmark's modes (one process, parts side by side, a LocalCluster) write the same labels;
    its figures themselves are measurements, not asserted."""
    inp = tmp_path / "in"
    img = RNG.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for i in range(4):
        write(inp, f"2DBox_CT_{i}.npz", imgs=np.roll(img, 5 * i, axis=1), boxes=np.array([[5, 5, 40, 30]]))
    write(inp, "3DBox_MR_v.npz", imgs=RNG.integers(0, 256, (6, 30, 40), dtype=np.uint8),
          boxes=np.array([[2, 2, 1, 20, 20, 4]]))
    proc = run_cli("bench-throughput", "-i", str(inp), "--cases", "3", "--weights", str(tiny_export),
                   "--json", str(tmp_path / "t.json"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    import json

    report = json.loads((tmp_path / "t.json").read_text())
    assert report["cases"] == ["2DBox_CT_0.npz", "2DBox_CT_1.npz", "2DBox_CT_3.npz"]  # spread over the list
    assert [m["name"].split(":")[0] for m in report["modes"]] == \
        ["1 process, 1 thread", "1 process, all cores", "--num-parts 2", "--dask local"]
    assert all(m["ok"] == 3 and m["identical"] == 3 and not m["message"] for m in report["modes"]), report["modes"]
    assert [len(m["process_seconds"]) for m in report["modes"]] == [1, 1, 2, 1]
    assert "cases/min" in proc.stdout and "CPU: " in proc.stdout
