"""Where torch is not installed (a runtime-only machine), the tests of the PyTorch side skip and say how
to install it; they do not error. Runs pytest itself in a subprocess where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys

from conftest import BLOCK_TORCH, REPO

_PYTEST_WITHOUT_TORCH = BLOCK_TORCH + (
    "import pytest\n"
    "sys.exit(pytest.main(sys.argv[1:]))\n"
)


def test_torch_tests_skip_with_the_reason_without_torch():
    tests = ["tests/test_train_losses.py",  # imports torch at its top
             "tests/test_progress.py::test_segment_redirected_prints_a_line_per_input_and_the_summary",  # fixture
             "tests/test_cli_help.py::test_version"]  # needs no torch: still runs
    proc = subprocess.run([sys.executable, "-c", _PYTEST_WITHOUT_TORCH, "-q", "-rs", "-p", "no:cacheprovider",
                           *tests], cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "1 passed, 2 skipped" in out, out
    assert "error" not in out.lower().split("short test summary info")[-1], out
    reason = "torch is not installed: pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert out.count(reason) == 2, out
