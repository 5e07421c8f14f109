"""A newcomer's first steps, as the README writes them: a fresh copy of the checkout, a fresh venv,
a normal (non-editable) ``pip install .``, the README's first command verbatim, then the installed
command and the README's Python example from another directory with the checkout gone.

Needs the PyPI registry or pip's cache for the runtime dependencies (CI has both).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SAMPLE, need

pytestmark = pytest.mark.slow

README = REPO / "README.md"
CASES = ("2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz", "3DBox_MR_pyradiomics_brain1.npz")


def readme_first_command() -> str:
    """The first shell line of the README that installs and predicts."""
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.splitlines():
            if "pip install ." in line and "predict" in line:
                return line.strip()
    raise AssertionError("README has no install-and-predict command")


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


def _copy_checkout(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a clone of this working tree holds."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _clean_env() -> dict[str, str]:
    """The user's shell: no settings of this project, no virtualenv of the test run on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_MEDSAM_") and k not in
           ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.prefix) / "bin")
    if sys.prefix != sys.base_prefix:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    # python3 on PATH is what the user has; make sure it is a Python this project supports.
    env["PATH"] = os.pathsep.join([str(Path(sys._base_executable).parent), env["PATH"]])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(checkout copy, its .venv, the inputs, the first outputs, seconds from install to first output)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    root = tmp_path_factory.mktemp("newcomer")
    src, inputs, outputs = root / "src", root / "in", root / "out"
    src.mkdir()
    inputs.mkdir()
    _copy_checkout(src)
    for name in CASES:
        shutil.copy(need(SAMPLE / "imgs" / name), inputs / name)
    command = readme_first_command().replace("INPUT_DIR", str(inputs)).replace("OUTPUT_DIR", str(outputs))
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=src, env=_clean_env(), capture_output=True, text=True,
                          encoding="utf-8", timeout=1800)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return src, src / ".venv", inputs, outputs, seconds


def test_readme_first_command_works_verbatim(fresh, capsys):
    _, _, inputs, outputs, seconds = fresh
    for name in CASES:
        with np.load(inputs / name) as case, np.load(outputs / name) as out:
            assert out["segs"].shape == (case["imgs"].shape if case["boxes"].shape[1] == 6 else case["imgs"].shape[:2])
            assert out["segs"].max() == len(case["boxes"])
    assert (outputs / "timing.csv").read_text().count("\n") == len(CASES) + 1
    with capsys.disabled():
        print(f"\nREADME first command (venv + pip install . + predict of {len(CASES)} cases): {seconds:.0f} s")


def _site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def test_installs_two_clearly_named_packages_with_every_module(fresh):
    _, venv, _, _, _ = fresh
    site = _site_packages(venv)
    for generic in ("app", "export", "weights"):
        assert not (site / generic).exists(), f"site-packages/{generic} installed"
    assert (site / "mcp_medsam" / "weights" / "manifest.json").is_file()
    for folder, package in (("app", "mcp_medsam"), ("export", "mcp_medsam_torch")):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder)
            assert (site / package / rel).is_file(), f"{package}/{rel} is not in the wheel (pyproject packages)"
    assert (site / "mcp_medsam_torch" / "default_weights.json").is_file()


def test_installed_command_runs_anywhere_without_the_checkout(fresh, tmp_path):
    src, venv, inputs, _, _ = fresh
    for entry in list(src.iterdir()):  # the checkout is gone; only its .venv stays
        if entry.name != ".venv":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env()
    proc = subprocess.run([str(venv / "bin" / "mcp-medsam"), "predict", "-i", str(inputs), "-o", "out"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((elsewhere / "out" / n).is_file() for n in CASES)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "mcp_medsam", "predict", "--help"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0 and "--weights" in proc.stdout, proc.stderr
    # The README's Python example, as written, in the runtime-only install (no torch there).
    script = elsewhere / "example.py"
    script.write_text(readme_python_example() + "\nimport sys\n"
                      "assert 'torch' not in sys.modules\n"
                      "print('RESULT', labels.shape, labels.dtype, int((labels == 1).sum()), mask.shape, round(iou, 3),"
                      " labels3d.shape)\n")
    proc = subprocess.run([str(venv / "bin" / "python"), str(script)], cwd=elsewhere, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RESULT (300, 400) uint8" in proc.stdout, proc.stdout
