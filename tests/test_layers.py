"""Layers point one way: the runtime (app/ = mcp_medsam) <- the PyTorch side (export/ = mcp_medsam_torch)
<- the CLI wiring (app/cli.py). The runtime never imports torch, transformers or the PyTorch side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

HEAVY = ("torch", "transformers", "torchvision", "timm", "nncf", "onnx", "mcp_medsam_torch")
# The repository's folder names are not import names: code that imported them would run a second,
# uninstalled copy of a module (and catch the wrong exception classes).
FOLDER_NAMES = ("app", "export", "weights")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in a file; relative imports resolved to their package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try))
                                        for n in ast.walk(s)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), id(node) in top))
    return out


def _runtime_modules() -> list[Path]:
    return sorted(p for p in (REPO / "app").rglob("*.py") if p.name != "cli.py")


def test_runtime_imports_nothing_of_pytorch():
    assert len(_runtime_modules()) >= 15
    for path in _runtime_modules():
        for name, _ in _imports(path):
            root = name.split(".")[0]
            assert root not in HEAVY, f"{path.relative_to(REPO)} imports {name}"
            assert root not in FOLDER_NAMES, f"{path.relative_to(REPO)} imports {name}: use a relative import"


def test_cli_reaches_the_pytorch_side_only_lazily():
    for name, module_level in _imports(REPO / "app" / "cli.py"):
        root = name.split(".")[0]
        assert root not in ("torch", "transformers"), name
        if root == "mcp_medsam_torch":
            assert not module_level, f"cli.py imports {name} at module level"


def test_pytorch_side_uses_the_installed_names():
    for path in sorted((REPO / "export").rglob("*.py")):
        for name, _ in _imports(path):
            assert name.split(".")[0] not in FOLDER_NAMES, f"{path.relative_to(REPO)} imports {name}"


def test_importing_every_runtime_module_loads_no_pytorch():
    mods = ["mcp_medsam." + ".".join(p.relative_to(REPO / "app").with_suffix("").parts).replace(".__init__", "")
            for p in _runtime_modules() if p.name != "__main__.py"]
    mods = [m.removesuffix(".__init__") for m in mods if m != "mcp_medsam.__init__"] + ["mcp_medsam.cli"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except ImportError as e:\n        print('OPTIONAL', m, e.name)\n"
            f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", capture_output=True, text=True,
                          encoding="utf-8", timeout=300)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
