"""The appliance through its real command line, on a tiny exported model (seconds per run)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli


def _write(folder: Path, name: str, **arrays) -> None:
    np.savez_compressed(folder / name, **arrays)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Good and bad cases side by side."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    img2 = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    vol = rng.integers(0, 256, (12, 40, 50), dtype=np.uint8)
    _write(d, "2DBox_CT_good.npz", imgs=img2, boxes=np.array([[10, 10, 60, 50], [40, 30, 100, 80]]))
    _write(d, "2DBox_XRay_grey.npz", imgs=img2[:, :, 0], boxes=np.array([[-10, 5, 60, 200]]))  # clipped
    _write(d, "2DBox_Microscope_many.npz", imgs=img2,
           boxes=np.array([[x, y, x + 6, y + 6] for x in range(0, 100, 6) for y in range(0, 84, 5)])[:300])
    _write(d, "2DBox_US_none.npz", imgs=img2, boxes=np.zeros((0, 4), np.int64))
    _write(d, "3DBox_MR_vol.npz", imgs=vol, boxes=np.array([[5, 5, 2, 30, 30, 9], [20, 10, 4, 45, 35, 6]]))
    _write(d, "3DBox_PET_nospacing.npz", imgs=vol, boxes=np.array([[5, 5, 0, 30, 30, 11]]))
    _write(d, "2DBox_Foo_unknown.npz", imgs=img2, boxes=np.array([[10, 10, 60, 50]]))
    _write(d, "2DBox_CT_inverted.npz", imgs=img2, boxes=np.array([[60, 10, 10, 50]]))
    _write(d, "2DBox_CT_outside.npz", imgs=img2, boxes=np.array([[200, 10, 260, 50]]))
    _write(d, "2DBox_CT_nan.npz", imgs=np.full((20, 20, 3), np.nan), boxes=np.array([[1, 1, 5, 5]]))
    _write(d, "2DBox_CT_nokeys.npz", image=img2)
    _write(d, "3DBox_CT_zflip.npz", imgs=vol, boxes=np.array([[5, 5, 9, 30, 30, 2]]))
    (d / "2DBox_CT_broken.npz").write_bytes(b"this is not a zip file")
    return d


GOOD = {"2DBox_CT_good.npz", "2DBox_XRay_grey.npz", "2DBox_Microscope_many.npz", "2DBox_US_none.npz",
        "3DBox_MR_vol.npz", "3DBox_PET_nospacing.npz"}
BAD = {
    "2DBox_Foo_unknown.npz": "unknown modality 'Foo'",
    "2DBox_CT_inverted.npz": "inverted",
    "2DBox_CT_outside.npz": "wholly outside",
    "2DBox_CT_nan.npz": "NaN",
    "2DBox_CT_nokeys.npz": "missing key(s) imgs, boxes",
    "3DBox_CT_zflip.npz": "z_min > z_max",
    "2DBox_CT_broken.npz": "not a readable .npz file",
}


@pytest.fixture(scope="module")
def run(cases, tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("predict", "-i", str(cases), "-o", str(out), "--weights", str(tiny_export),
                   "--overlays", str(out / "png"), "--max-batch", "3")
    with open(out / "timing.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    return proc, out, rows


def test_exit_status_and_one_line_per_failed_case(run):
    proc, _, _ = run
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ": failed: " in ln]
    assert len(lines) == len(BAD)
    assert "13 cases: 6 segmented, 0 kept from an earlier run, 7 failed in " in proc.stderr


def test_bad_cases_get_specific_messages_and_no_output(run):
    _, out, rows = run
    for name, message in BAD.items():
        assert rows[name]["status"] == "failed", name
        assert message in rows[name]["message"], (name, rows[name]["message"])
        assert not (out / name).exists()
    assert "accepted: CT, MR" in rows["2DBox_Foo_unknown.npz"]["message"]


def test_good_cases_written_with_the_right_shapes_and_dtypes(run, cases):
    _, out, rows = run
    for name in GOOD:
        assert rows[name]["status"] == "ok", rows[name]
        with np.load(cases / name) as src, np.load(out / name) as dst:
            segs, imgs, boxes = dst["segs"], src["imgs"], src["boxes"]
        assert segs.shape == (imgs.shape if imgs.ndim == 3 and boxes.shape[1] == 6 else imgs.shape[:2])
        assert segs.dtype == (np.uint16 if len(boxes) > 255 else np.uint8)
        assert segs.max() <= len(boxes)
    with np.load(out / "2DBox_US_none.npz") as d:
        assert not d["segs"].any()
    # Temporary files never stay behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_3d_covers_every_slice_of_each_box_inclusive(run):
    _, _, rows = run
    assert rows["3DBox_PET_nospacing.npz"]["slices"] == "12"  # z 0..11
    assert rows["3DBox_MR_vol.npz"]["slices"] == "8"  # z 2..9 (box 2: 4..6 inside)
    assert rows["2DBox_CT_good.npz"]["boxes"] == "2"


def test_overlays(run):
    _, out, _ = run
    pngs = sorted(p.name for p in (out / "png").glob("*.png"))
    assert pngs == sorted(n.replace(".npz", ".png") for n in GOOD)
    assert (out / "png" / "3DBox_MR_vol.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_modality_and_empty_folder(tmp_path, cases, tiny_export):
    one = tmp_path / "one"
    one.mkdir()
    (one / "2DBox_Foo_unknown.npz").write_bytes((cases / "2DBox_Foo_unknown.npz").read_bytes())
    proc = run_cli("predict", "-i", str(one), "-o", str(tmp_path / "o1"), "--weights", str(tiny_export),
                   "--default-modality", "CT")
    assert proc.returncode == 0, proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("predict", "-i", str(empty), "-o", str(tmp_path / "o2"), "--weights", str(tiny_export))
    assert proc.returncode == 1 and "no .npz cases in" in proc.stderr
    proc = run_cli("predict", "-i", str(one), "-o", str(tmp_path / "o3"), "--weights", str(tmp_path))
    assert proc.returncode == 1 and "no manifest.json" in proc.stderr


def test_onnxruntime_backend_agrees_with_openvino(run, cases, tiny_export, tmp_path):
    _, out, _ = run
    proc = run_cli("predict", "-i", str(cases), "-o", str(tmp_path), "--weights", str(tiny_export),
                   "--backend", "onnxruntime")
    assert proc.returncode == 1
    for name in GOOD:
        with np.load(out / name) as a, np.load(tmp_path / name) as b:
            assert np.mean(a["segs"] == b["segs"]) > 0.999, name


def test_predict_never_imports_torch(cases, tiny_export, tmp_path):
    code = (
        "import sys\n"
        "from mcp_medsam.cli import cli\n"
        f"try:\n    cli(['predict', '-i', {str(cases)!r}, '-o', {str(tmp_path)!r},"
        f" '--weights', {str(tiny_export)!r}])\n"
        "except SystemExit:\n    pass\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'mcp_medsam_torch'))\n"
        "print('HEAVY', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", timeout=600)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "2DBox_CT_good.npz").exists()


def test_help_states_the_robustness_options():
    proc = run_cli("predict", "--help", env={"COLUMNS": "400"})  # one line per option
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--max-image-mb" in text and "[default: 2048.0]" in text and "CVPR24 or CVPR25" in text
    assert "must not be the input folder" in text
    proc = run_cli("verify-weights", "--help")
    assert proc.returncode == 0 and "sha256" in proc.stdout


def test_a_rerun_into_the_same_folder_keeps_the_other_rows(cases, tiny_export, tmp_path):
    """The timing CSV describes every case in OUT: a second run on other cases adds its rows."""
    out = tmp_path / "out"
    for name in ("2DBox_CT_good.npz", "3DBox_MR_vol.npz"):
        one = tmp_path / name
        one.mkdir()
        (one / name).write_bytes((cases / name).read_bytes())
        proc = run_cli("predict", "-i", str(one), "-o", str(out), "--weights", str(tiny_export), "--threads", "1")
        assert proc.returncode == 0, proc.stderr
    with open(out / "timing.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == ["2DBox_CT_good.npz", "3DBox_MR_vol.npz"]
