"""The command line as a newcomer meets it, through the real console entry point in a subprocess: help
of every command (also where torch is not installed), one ``error:`` line for a bad command line, a
missing extra or Ctrl-C, ``--version``, the modality aliases, and the API's errors for a missing model
folder and a 0..1 float image."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BLOCK_TORCH, REPO, run_cli

# The console command in a fresh interpreter where torch cannot be imported (a runtime-only install).
_NO_TORCH = BLOCK_TORCH + (
    "sys.argv = ['mcp-medsam', *sys.argv[1:]]\n"
    "from mcp_medsam.cli import main\n"
    "main()\n"
)


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", env={**os.environ, "COLUMNS": "100"}, timeout=300)


def command_paths() -> list[str]:
    """Every command of the CLI: "predict", "timing merge", ..."""
    import typer

    from mcp_medsam.cli import cli

    found = []

    def walk(cmd, path: str) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found.append(path)

    walk(typer.main.get_command(cli), "")
    return found


def test_every_help_works_without_torch():
    paths = command_paths()
    assert {"predict", "segment", "train", "distill", "export", "timing merge", "evaluate"} <= set(paths)
    for path in ["", *paths]:
        proc = run_without_torch(*path.split(), "--help")
        assert proc.returncode == 0, (path, proc.stderr)
        assert "Traceback" not in proc.stderr and "Usage: mcp-medsam" in proc.stdout, (path, proc.stderr)
        # Values as words, no Python types; flags without a value placeholder.
        assert not re.search(r"<(bool|str|path|int|float|list\[)", proc.stdout, flags=re.I), (path, proc.stdout)
    proc = run_without_torch("train", "--help")
    assert "note:" in proc.stdout and "pip install 'mcp-medsam[export]'" in proc.stdout


@pytest.mark.parametrize("argv", [["train", "--data-dirs", "x"], ["distill", "--data-dirs", "x"],
                                  ["export", "--out", "x"]])
def test_pytorch_commands_without_torch_say_which_extra_in_one_line(argv, tmp_path):
    proc = run_without_torch(*[str(tmp_path / a) if a == "x" else a for a in argv])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: mcp-medsam {argv[0]} needs the PyTorch side"), lines
    assert "pip install 'mcp-medsam[export]'" in lines[0]
    assert "https://download.pytorch.org/whl/cpu" in lines[0]
    assert not (tmp_path / "x").exists()


def test_version():
    from mcp_medsam import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mcp-medsam {__version__}"


def test_command_list_has_whole_first_sentences():
    for columns in ("80", "60"):
        proc = run_cli("--help", env={"COLUMNS": columns})
        listing = proc.stdout.split("Commands:")[1]
        assert "..." not in listing, listing
        # Each command's line (and its wrapped continuation) is one sentence ending with a full stop.
        entries = re.split(r"\n  (?=\S)", listing.strip())
        assert len(entries) == len({p.split()[0] for p in command_paths()}), entries
        for entry in entries:
            assert entry.rstrip().endswith("."), entry
            assert entry.count(". ") == 0, entry


def test_flags_and_defaults_are_shown_once():
    proc = run_cli("segment", "--help")
    text = proc.stdout
    assert "{INPUT}..." in text and "<list" not in text
    assert "--skip-existing / --no-skip-existing" in text
    blocks = re.split(r"\n  (?=-)", text.split("Options:")[1])
    options = {o.split()[0]: " ".join(o.split()) for o in blocks if o.strip()}
    assert options["--min-size"].count("10") == 1 and "[default: 10]" in options["--min-size"], options["--min-size"]
    for option in options.values():
        assert not ("Default:" in option and "[default:" in option), option


def test_bad_command_lines_are_one_error_line(tmp_path):
    proc = run_cli("segment", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: Missing option '--modality' / '-m'. (see 'mcp-medsam segment --help')"]
    proc = run_cli("predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--skip-existing", "true")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--no-NAME" in lines[0], lines
    proc = run_cli("predict", "--no-such-option")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "│" not in proc.stderr


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see the command wait")
def test_ctrl_c_ends_with_one_error_line_and_130(tmp_path):
    """SIGINT while ``timing merge`` waits for the output folder's lock, which this test holds (the kernel
    lists the waiting request in /proc/locks: no guessing how long to wait)."""
    from mcp_medsam.batch import TIMING_FIELDS
    from mcp_medsam.io.atomic import folder_lock

    for i in range(2):
        (tmp_path / f"timing.part-{i}-of-2.csv").write_text(",".join(TIMING_FIELDS) + "\n")
    with folder_lock(tmp_path):
        proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "timing", "merge", str(tmp_path)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        try:
            deadline = time.monotonic() + 120
            while not any(line.split()[1] == "->" and line.split()[5] == str(proc.pid)
                          for line in Path("/proc/locks").read_text().splitlines()):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the command never waited for the lock"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines() == ["error: interrupted (Ctrl-C)"], err
    assert not (tmp_path / "timing.csv").exists()


def test_mri_is_an_alias_of_mr(tmp_path):
    from mcp_medsam.modality import ACCEPTED, accepted_token, clip_text

    assert accepted_token("MRI") == accepted_token("mri") == "MR" and "MRI" not in ACCEPTED
    assert clip_text(accepted_token("MRI")) == "MR Image"  # the MR token's CLIP text, none of its own
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(tmp_path / "slice.png")
    for name in ("MRI", "MR"):
        proc = run_cli("segment", str(tmp_path / "slice.png"), "-o", str(tmp_path / f"{name}.png"), "-m", name,
                       "--box", "5,5,30,40")
        assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "MRI.png")), np.asarray(Image.open(tmp_path / "MR.png")))


def test_api_errors_name_the_problem(tmp_path):
    from mcp_medsam import InputError, ModelError, Segmenter

    with pytest.raises(ModelError, match="no such folder"):
        Segmenter.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        Segmenter.load(tmp_path / "file")
    seg = Segmenter.load()
    emb = seg.embed(np.zeros((30, 40), np.uint8))
    assert repr(emb) == "Embedding(image=(30, 40, 3) uint8, embedding=(1, 256, 64, 64) float32, new_hw=(192, 256))"
    image = np.random.default_rng(0).random((30, 40))
    with pytest.raises(InputError, match=r"float64 with values in .*0\.\.1.*uint8"):
        seg.segment_image(image, [[2, 2, 20, 20]], "XRay")
    # Numbers in 0..255 of another dtype are still taken as documented (rounded to uint8).
    same = seg.segment_image((image * 255).round(), [[2, 2, 20, 20]], "XRay")
    assert np.array_equal(same, seg.segment_image((image * 255).round().astype(np.uint8), [[2, 2, 20, 20]], "XRay"))
