"""Seconds per nnInteractive interaction and the memory of concurrent sessions, against a real
``mcp-medsam serve`` driven by the PyPI client (a benchmark, not a test).

    python tools/nninteractive_bench.py [--sessions 4] [--threads N] [--depth 100] [--size 512]

The volume is the sample STS-001 CT (59 x 202 x 198, Hounsfield units) resampled to depth x size x size
(linear), so the model sees real anatomy at the size the README quotes; the box is the case's own
box scaled along, on its middle slice. Prints: set_image, the first 2D box (its slice and the slices
the object continues over are embedded), a box on a slice already embedded (decoder only), and the
server's resident memory with the model only, with N sessions each holding the volume and one object,
and after they are released.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "sample" / "imgs" / "3DBox_CT_STS_STS-001.npz"
NIFTI = REPO.parent / "shared" / "data" / "formats" / "nifti" / "STS-001-CT_image.nii.gz"
TOKEN = "bench-token-0123456789abcdef"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def volume(depth: int, size: int) -> tuple[np.ndarray, list[list[int]]]:
    from mcp_medsam.io.medical import read_image

    raw = read_image(NIFTI).array.astype(np.float32)  # (59, 202, 198) HU
    with np.load(SAMPLE) as d:
        x0, y0, z0, x1, y1, z1 = (int(v) for v in d["boxes"][0])
    d0, h0, w0 = raw.shape
    plane = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR) for s in raw])
    pos = np.linspace(0, d0 - 1, depth)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, d0 - 1)
    t = (pos - lo)[:, None, None].astype(np.float32)
    vol = plane[lo] * (1 - t) + plane[hi] * t
    sy, sx, sz = size / h0, size / w0, depth / d0
    z = int((z0 + z1) / 2 * sz)
    box = [[z, z + 1], [int(y0 * sy), int(y1 * sy) + 1], [int(x0 * sx), int(x1 * sx) + 1]]
    return np.ascontiguousarray(vol), box


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--box-every-session", action="store_true",
                    help="Every session also segments the box (its own walk and embeddings); default: the first only, "
                         "the others hold the volume and an empty object.")
    args = ap.parse_args()

    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    from mcp_medsam.serve.loadcheck import free_port, stop_server, wait_healthy

    vol, box = volume(args.depth, args.size)
    port = free_port()
    log = tempfile.TemporaryFile()
    cmd = [sys.executable, "-m", "mcp_medsam", "serve", "--port", str(port), "--sessions", str(args.sessions),
           "--log-level", "warning",
           "--session-idle-s", "36000"] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "MCP_MEDSAM_TOKEN": TOKEN}, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/nninteractive"
    try:
        wait_healthy(proc, port, log, 300)
        print(f"volume {vol.shape} float32 ({vol.nbytes / 2**20:.0f} MB), box {box}", flush=True)
        base = rss_mb(proc.pid)
        clients = []
        for i in range(args.sessions):
            c = nnInteractiveRemoteInferenceSession(url, api_key=TOKEN, read_timeout=3600)
            clients.append(c)
            t0 = time.perf_counter()
            c.set_image(vol[None])
            t1 = time.perf_counter()
            buf = np.zeros(vol.shape, np.uint8)
            c.set_target_buffer(buf)
            t2 = time.perf_counter()
            if i == 0 or args.box_every_session:
                c.add_bbox_interaction(box, include_interaction=True)
            t3 = time.perf_counter()
            zs = np.flatnonzero(buf.any(axis=(1, 2)))
            if i == 0:
                print(f"set_image {t1 - t0:.2f} s; set_target_buffer {t2 - t1:.3f} s; first box {t3 - t2:.2f} s "
                      f"(object over slices {zs[0]}..{zs[-1]}: {len(zs)} slices with a mask, each embedded and "
                      f"decoded, {(t3 - t2) / max(len(zs), 1):.2f} s per slice)", flush=True)
                again = [[box[0][0], box[0][0] + 1], [box[1][0] + 4, box[1][1] - 4], [box[2][0] + 4, box[2][1] - 4]]
                t4 = time.perf_counter()
                c.add_bbox_interaction(again, include_interaction=True)
                print(f"a box on an embedded slice {time.perf_counter() - t4:.2f} s", flush=True)
            print(f"session {i + 1}: set_image {t1 - t0:.2f} s, server RSS {rss_mb(proc.pid):.0f} MB", flush=True)
        held = rss_mb(proc.pid)
        for c in clients:
            c.close()
        time.sleep(1.0)  # release frees synchronously; the pause only lets the allocator return pages
        print(f"server RSS: model only {base:.0f} MB; {args.sessions} sessions {held:.0f} MB "
              f"(+{(held - base) / args.sessions:.0f} MB each); after release {rss_mb(proc.pid):.0f} MB")
    finally:
        stop_server(proc)
        log.close()


if __name__ == "__main__":
    main()
