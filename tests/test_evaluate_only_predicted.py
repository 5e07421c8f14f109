"""``mcp-medsam evaluate`` over a ground-truth folder that holds more cases than were predicted: the
summary says how many had no prediction, and ``--only-predicted`` scores the predicted ones alone."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import SHARED, SAMPLE, need, run_cli

PREDICTED = ("2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz", "2DBox_Dermoscopy_PH2_IMD003.npz")
NOT_PREDICTED = ("2DBox_US_HC18_000.npz", "3DBox_PET_STS_STS-002.npz", "2DBox_Fundus_DRIVE_21.npz")


@pytest.fixture
def folders(tmp_path):
    pytest.importorskip("scipy", reason="evaluate needs the eval extra (scipy)")
    gts, segs = tmp_path / "gts", tmp_path / "segs"
    gts.mkdir()
    segs.mkdir()
    for name in PREDICTED + NOT_PREDICTED:
        shutil.copy(need(SAMPLE / "gts" / name), gts / name)
    for name in PREDICTED:
        shutil.copy(need(SHARED / "reference" / "golden" / "segs" / name), segs / name)
    return gts, segs


def overall(stdout: str) -> tuple[int, float]:
    n, dsc = re.search(r"^overall\s+(\d+)\s+([\d.]+)", stdout, flags=re.M).groups()
    return int(n), float(dsc)


def test_only_predicted_scores_the_predicted_cases_and_counts_the_others(folders):
    gts, segs = folders
    every = run_cli("evaluate", "--segs", str(segs), "--gts", str(gts))
    assert every.returncode == 1  # missing predictions are problems unless left out
    assert "ground-truth cases without a prediction: 3 of 5 (each scored 0; --only-predicted leaves them out)" \
        in every.stdout
    only = run_cli("evaluate", "--segs", str(segs), "--gts", str(gts), "--only-predicted")
    assert only.returncode == 0, only.stdout + only.stderr
    assert "ground-truth cases without a prediction: 3 of 5 (left out: --only-predicted)" in only.stdout
    assert "problems: none" in only.stdout
    n_all, dsc_all = overall(every.stdout)
    n_only, dsc_only = overall(only.stdout)
    assert (n_all, n_only) == (5, 2)
    # The same two cases scored alone: the overall is their mean, not diluted by three zeros.
    alone = run_cli("evaluate", "--segs", str(segs), "--gts", str(gts), "--only-predicted", "--csv",
                    str(gts.parent / "cases.csv"))
    rows = (gts.parent / "cases.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == sorted(PREDICTED) and alone.returncode == 0
    assert dsc_only > dsc_all > 0


def test_only_predicted_without_any_prediction_is_one_error_line(folders, tmp_path):
    gts, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("evaluate", "--segs", str(empty), "--gts", str(gts), "--only-predicted")
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: no prediction in {empty} is named like a ground-truth case of {gts}"]
