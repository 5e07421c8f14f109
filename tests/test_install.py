"""A newcomer's first steps, as the README writes them: the quick start's commands verbatim in a fresh
copy of the checkout (for its ``git clone``), which make a fresh venv, a normal (non-editable)
``pip install .``, segment the sample cases of ``examples/`` and score them; then the installed command
and the README's Python example from another directory with the checkout gone.

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


def readme_quick_start() -> tuple[str, list[str]]:
    """(the folder the quick start's ``git clone`` makes, its commands after that line)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text[text.index("## Quick start"):], flags=re.S).group(1)
    first, *rest = [line.strip() for line in block.splitlines() if line.strip()]
    m = re.fullmatch(r"git clone \S+ (\S+) && cd \1", first)
    assert m, f"the quick start does not begin with getting the code: {first}"
    assert any("pip install ." in line and "predict" in line for line in rest), rest
    return m.group(1), rest


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
    """(checkout copy, its .venv, other inputs, the quick start's outputs, its output, seconds it took)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    root = tmp_path_factory.mktemp("newcomer")
    folder, commands = readme_quick_start()
    src, inputs = root / folder, root / "in"
    src.mkdir()
    inputs.mkdir()
    _copy_checkout(src)  # what the git clone gives
    for name in CASES:
        shutil.copy(need(SAMPLE / "imgs" / name), inputs / name)
    script = "set -e\n" + "\n".join(commands) + "\n"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", script], cwd=src, env=_clean_env(), capture_output=True, text=True,
                          encoding="utf-8", timeout=1800)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return src, src / ".venv", inputs, src / "segs", proc, seconds


def test_readme_quick_start_works_verbatim(fresh, capsys):
    src, _, _, outputs, proc, seconds = fresh
    examples = sorted(p.name for p in (src / "examples" / "imgs").glob("*.npz"))
    assert 2 <= len(examples) <= 5
    assert sorted(p.name for p in (src / "examples" / "gts").glob("*.npz")) == examples
    assert sum(p.stat().st_size for p in (src / "examples").rglob("*")) < 600_000  # small enough to ship
    for name in examples:
        with np.load(src / "examples" / "imgs" / name) as case, np.load(outputs / name) as out:
            assert out["segs"].shape == (case["imgs"].shape if case["boxes"].shape[1] == 6 else case["imgs"].shape[:2])
            assert out["segs"].max() == len(case["boxes"])
    assert (outputs / "timing.csv").read_text().count("\n") == len(examples) + 1
    assert f"{len(examples)} cases: {len(examples)} segmented, 0 kept from an earlier run, 0 failed" in proc.stderr
    # evaluate on the shipped ground truth: every case scored, none missing, a sane overall DSC.
    overall = re.search(r"^overall\s+(\d+)\s+([\d.]+)", proc.stdout, flags=re.M)
    assert overall and int(overall.group(1)) == len(examples) and float(overall.group(2)) > 50, proc.stdout
    assert "ground-truth cases without a prediction: 0 of" in proc.stdout and "problems: none" in proc.stdout
    with capsys.disabled():
        print(f"\nREADME quick start (venv + pip install . + predict of {len(examples)} cases + eval extra + "
              f"evaluate): {seconds:.0f} s")


def _site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def test_installs_two_clearly_named_packages_with_every_module(fresh):
    _, venv, _, _, _, _ = fresh
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
    src, venv, inputs, _, _, _ = fresh
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
