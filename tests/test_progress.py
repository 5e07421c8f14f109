"""Progress and closing summaries through the real command line: one line per case or input when stderr
is no terminal, a bar on a terminal (a pseudo-terminal here), and a summary that names the segmented,
kept and failed counts and gives the run's wall time (not the sum of per-case seconds)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import REPO, SAMPLE, csv_rows, need, run_cli

CASES = ("2DBox_XRay_Montgomery_MCUCXR-0001-0.npz", "3DBox_PET_STS_STS-001.npz", "3DBox_PET_STS_STS-002.npz")
SUMMARY = re.compile(r"^(\d+) (cases|inputs): (\d+) segmented, (\d+) kept from an earlier run, (\d+) failed "
                     r"in ([\d.]+) s wall time$", flags=re.M)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in CASES:
        shutil.copy(need(SAMPLE / "imgs" / name), folder / name)
    return folder


def timed(*args: str, **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = run_cli(*args, **kw)
    return proc, time.perf_counter() - t0


def test_predict_redirected_prints_a_line_per_case_and_the_wall_time(inputs, tiny_export, tmp_path):
    out = tmp_path / "out"
    proc, elapsed = timed("predict", "-i", str(inputs), "-o", str(out), "--weights", str(tiny_export))
    assert proc.returncode == 0, proc.stderr
    for i, name in enumerate(CASES, start=1):
        assert re.search(rf"^{re.escape(name)}: ok, 1 boxes, [\d.]+ s \({i}/3\)$", proc.stderr, flags=re.M), proc.stderr
    (n, _, done, kept, failed, wall), = SUMMARY.findall(proc.stderr)
    assert (n, done, kept, failed) == ("3", "3", "0", "0")
    per_case = sum(float(r["seconds"]) for r in csv_rows(out / "timing.csv"))
    # The wall time holds the model load as well as the cases, and no more than the process lived.
    assert per_case <= float(wall) + 0.05 and float(wall) <= elapsed, (per_case, wall, elapsed)

    # A resumed run: the kept cases are named as kept, not counted as segmented.
    (out / CASES[1]).unlink()
    proc = run_cli("predict", "-i", str(inputs), "-o", str(out), "--weights", str(tiny_export), "--skip-existing")
    assert proc.returncode == 0, proc.stderr
    assert f"{CASES[0]}: kept from an earlier run (1/3)" in proc.stderr
    assert re.search(rf"^{re.escape(CASES[1])}: ok, 1 boxes, [\d.]+ s \(2/3\)$", proc.stderr, flags=re.M)
    (n, _, done, kept, failed, _), = SUMMARY.findall(proc.stderr)
    assert (n, done, kept, failed) == ("3", "1", "2", "0"), proc.stderr


def test_segment_redirected_prints_a_line_per_input_and_the_summary(inputs, tiny_export, tmp_path):
    paths = [str(inputs / n) for n in CASES]
    proc, elapsed = timed("segment", *paths, "-o", str(tmp_path / "out") + "/", "-m", "PET",
                          "--weights", str(tiny_export))
    assert proc.returncode == 0, proc.stderr
    assert [ln.split(" -> ")[0] for ln in proc.stdout.splitlines()] == paths  # one line per input, in order
    assert "box-slice" not in proc.stderr  # no bar in a log
    (n, what, done, kept, failed, wall), = SUMMARY.findall(proc.stderr)
    assert (n, what, done, kept, failed) == ("3", "inputs", "3", "0", "0") and float(wall) <= elapsed
    proc = run_cli("segment", *paths, "-o", str(tmp_path / "out") + "/", "-m", "PET", "--weights", str(tiny_export),
                   "--skip-existing")
    (n, what, done, kept, failed, _), = SUMMARY.findall(proc.stderr)
    assert (n, done, kept, failed) == ("3", "0", "3", "0"), proc.stderr


def test_segment_on_a_terminal_shows_a_bar_of_box_slices(inputs, tiny_export, tmp_path):
    """stderr on a pseudo-terminal (as in an interactive shell): a volume's box-slices count up."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "segment", str(inputs / CASES[1]), "-o",
                             str(tmp_path / "pet.npz"), "-m", "PET", "--weights", str(tiny_export)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the command closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.wait(timeout=600)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, terminal
    counts = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) \[", terminal)]
    assert counts and counts[-1][0] == counts[-1][1] > 1, terminal  # the bar reached every box-slice
    assert "box-slice" in terminal and "3DBox_PET_STS_STS-001.npz (1/1)" in terminal
    assert SUMMARY.search("\n".join(re.split(r"[\r\n]+", terminal))), terminal  # the bar cleared, then the summary
