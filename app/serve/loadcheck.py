"""``mcp-medsam serve-bench``: a load check of ``mcp-medsam serve`` on loopback (a benchmark, not a test).

Starts the real server (``python -m mcp_medsam serve`` on a free port), then runs two phases
against it over HTTP/1.1 keep-alive connections (the standard library's ``http.client``):

1. idle: one client, each 2D case uploaded once and ``decodes`` single-box requests on it: the
   latency of a box decode on an embedded image and of an upload+embed with nobody else waiting;
2. load: ``clients`` concurrent clients for ``seconds``, each in a loop: upload a case (+embed),
   ``decodes`` single-box segment requests on it, delete it.

Reported side by side: requests/s, p50/p95 of each request kind per phase, errors (any non-2xx or
failed request; must be 0) and the server's peak RSS (``VmHWM`` of its process).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    boxes: list[list[int]]


@dataclass
class Phase:
    """Latencies (s) by request kind, errors, and the phase's wall time."""

    latency: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency.setdefault(kind, []).append(seconds)

    def fail(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latency.values())

    def summary(self) -> dict[str, Any]:
        kinds = {}
        for kind, values in sorted(self.latency.items()):
            a = np.asarray(values) * 1000
            kinds[kind] = {"n": len(values), "p50_ms": round(float(np.percentile(a, 50)), 1),
                           "p95_ms": round(float(np.percentile(a, 95)), 1)}
        return {"seconds": round(self.seconds, 2), "requests": self.requests,
                "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
                "errors": len(self.errors), "error_samples": self.errors[:5], "kinds": kinds}


@dataclass
class LoadReport:
    clients: int
    decodes: int
    cases: int
    cpu: str
    threads: int | None
    idle: Phase
    load: Phase
    peak_rss_mb: float | None

    @property
    def errors(self) -> int:
        return len(self.idle.errors) + len(self.load.errors)

    def as_dict(self) -> dict[str, Any]:
        return {"clients": self.clients, "decodes_per_upload": self.decodes, "cases": self.cases, "cpu": self.cpu,
                "threads": self.threads, "idle": self.idle.summary(), "load": self.load.summary(),
                "errors": self.errors, "server_peak_rss_mb": self.peak_rss_mb}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def load_cases(folder: Path) -> list[Case]:
    """The 2D CVPR24 cases (``imgs`` + ``boxes`` of 4) of a folder, as upload bytes and boxes."""
    cases = []
    for path in sorted(Path(folder).glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as d:
                boxes = np.asarray(d["boxes"]).reshape(-1, d["boxes"].shape[-1])
        except (OSError, KeyError, ValueError):
            continue
        if boxes.shape[1] == 4 and len(boxes):
            cases.append(Case(path.name, path.read_bytes(), boxes.astype(int).tolist()))
    if not cases:
        raise InputError(f"{folder}: no 2D CVPR24 cases (*.npz with imgs and boxes of 4)")
    return cases


def _multipart(case: Case) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{case.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + case.data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection; each call is timed into a phase, and every failure counted."""

    def __init__(self, port: int, phase: Phase) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.phase = phase

    def call(self, kind: str, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Any:
        t = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.phase.fail(f"{kind}: {exc.__class__.__name__}: {exc}")
            return None
        self.phase.add(kind, time.perf_counter() - t)
        if resp.status >= 300:
            self.phase.fail(f"{kind}: HTTP {resp.status} {data[:200].decode('utf-8', 'replace')}")
            return None
        return json.loads(data) if resp.getheader("content-type", "").startswith("application/json") else data

    def cycle(self, case: Case, decodes: int, offset: int, delete: bool = True) -> None:
        body, ctype = _multipart(case)
        image = self.call("upload+embed", "POST", "/v1/images", body, {"Content-Type": ctype})
        if image is None:
            return
        for k in range(decodes):
            box = case.boxes[(offset + k) % len(case.boxes)]
            self.call("decode", "POST", f"/v1/images/{image['id']}/segment",
                      json.dumps({"boxes": [box], "modality": image["modality"] or "CT"}).encode(),
                      {"Content-Type": "application/json", "Accept": "image/png"})
        if delete:
            self.call("delete", "DELETE", f"/v1/images/{image['id']}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, log: Any, timeout: float = 180.0) -> None:
    """Poll ``/healthz`` of a starting server; InputError (with the last line of its ``log``, a binary
    file it writes to) if it exits first or does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            last = (log.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1]
            raise InputError(f"the server exited with status {proc.returncode} before answering: {last}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)  # polling for start-up, not a measured wait
    raise InputError(f"the server did not answer /healthz within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """A clean shutdown (SIGINT, as Ctrl-C), killed after 30 s if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_load_check(inputs: Path, *, clients: int = 8, seconds: float = 30.0, decodes: int = 4,
                   weights: Path | None = None, threads: int | None = None,
                   json_path: Path | None = None) -> LoadReport:
    """Start ``mcp-medsam serve``, measure the idle and the loaded phase, stop it; see the module doc."""
    cases = load_cases(inputs)
    port = free_port()
    cmd = [sys.executable, "-m", "mcp_medsam", "serve", "--port", str(port), "--log-level", "warning",
           "--max-images", str(max(2 * clients, 16))]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_healthy(proc, port, log)
        idle = Phase()
        client = Client(port, idle)
        t = time.perf_counter()
        for i, case in enumerate(cases):
            client.cycle(case, decodes, i)
        idle.seconds = time.perf_counter() - t

        load = Phase()
        deadline = time.monotonic() + seconds

        def worker(n: int) -> None:
            c = Client(port, load)
            i = n
            while time.monotonic() < deadline:
                c.cycle(cases[i % len(cases)], decodes, i)
                i += clients

        pool = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
        t = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        load.seconds = time.perf_counter() - t
        rss = _peak_rss_mb(proc.pid)
    finally:
        stop_server(proc)
        log.close()
    report = LoadReport(clients=clients, decodes=decodes, cases=len(cases), cpu=_cpu_model(),
                        threads=threads or os.cpu_count(), idle=idle, load=load, peak_rss_mb=rss)
    if json_path is not None:
        from ..io.atomic import write_json

        write_json(json_path, report.as_dict())
    return report


def format_report(report: LoadReport) -> str:
    d = report.as_dict()
    lines = [f"serve load check: {d['cases']} 2D cases, {d['decodes_per_upload']} single-box decodes per upload, "
             f"{d['threads']} inference threads, CPU {d['cpu']}"]
    for phase, label in (("idle", "idle (1 client)"), ("load", f"load ({d['clients']} clients)")):
        p = d[phase]
        lines.append(f"{label}: {p['requests']} requests in {p['seconds']:.1f} s = {p['requests_per_s']:.2f} req/s, "
                     f"errors {p['errors']}")
        for kind, k in p["kinds"].items():
            lines.append(f"  {kind:<13} n={k['n']:<5} p50 {k['p50_ms']:8.1f} ms   p95 {k['p95_ms']:8.1f} ms")
        for sample in p["error_samples"]:
            lines.append(f"  error: {sample}")
    lines.append(f"server peak RSS: {d['server_peak_rss_mb']} MB; errors: {d['errors']}")
    return "\n".join(lines) + "\n"
