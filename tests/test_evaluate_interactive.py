"""`mcp-medsam evaluate-interactive`: box round + click rounds by the challenge's rule, in one process and as
one predict process per round (the same masks, so the same scores), on the tiny export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import SAMPLE, csv_rows, need, run_cli

pytest.importorskip("scipy", reason="evaluate-interactive needs the eval extra (scipy)")
pytest.importorskip("matplotlib", reason="evaluate-interactive needs the eval extra (matplotlib)")

from mcp_medsam.evaluation.interactive import auc  # noqa: E402

CASES = ["2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz", "3DBox_PET_STS_STS-002.npz"]


def test_auc_is_the_challenges_trapezoid():
    from scipy import integrate

    dscs = [0.5, 0.6, 0.65, 0.7, 0.69, 0.72]
    assert auc(dscs[1:]) == pytest.approx(integrate.cumulative_trapezoid(np.array(dscs[-5:]), np.arange(5))[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("interactive")
    for sub in ("imgs", "gts"):
        (root / sub).mkdir()
        for name in CASES:
            os.symlink(need(SAMPLE / sub / name), root / sub / name)
    return root


def test_one_process_and_one_process_per_round_agree(tiny_export, folder, tmp_path):
    runs = {}
    for mode, rounds in (("--one-process", 2), ("--per-round-process", 1)):
        out = tmp_path / mode.strip("-")
        proc = run_cli("evaluate-interactive", "-i", str(folder / "imgs"), "--gts", str(folder / "gts"), "-o", str(out),
                       "--weights", str(tiny_export), "--threads", "1", "--rounds", str(rounds), mode)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "DSC AUC" in proc.stdout and "90 s per class budget" in proc.stdout
        assert {p.name for p in out.iterdir()} == {"interactive.csv", "interactive.json", "dsc_per_click.png"}
        runs[mode] = out
    rows = csv_rows(runs["--one-process"] / "interactive.csv")
    assert [(r["case"], r["round"]) for r in rows] == [(c, str(i)) for c in CASES for i in range(3)]
    assert all(r["clicks"] == "0" for r in rows if r["round"] == "0")
    assert all(r["clicks"] == r["classes"] for r in rows if r["round"] == "1")  # every class has errors to click
    data = json.loads((runs["--one-process"] / "interactive.json").read_text())
    for case in data["cases"]:
        assert case["dsc_auc"] == pytest.approx(auc(case["dsc"][1:]))
        assert len(case["dsc"]) == len(case["nsd"]) == len(case["seconds"]) == 3
    assert set(data["modalities"]) == {"XRay", "PET"}
    # The rounds are the same masks either way: the scores of the rounds both ran agree exactly.
    per = {r["case"] + r["round"]: r for r in csv_rows(runs["--per-round-process"] / "interactive.csv")}
    for r in rows:
        if r["round"] in ("0", "1"):
            assert (r["dsc"], r["nsd"]) == (per[r["case"] + r["round"]]["dsc"], per[r["case"] + r["round"]]["nsd"])


def test_bad_folders_are_one_line(tiny_export, folder, tmp_path):
    proc = run_cli("evaluate-interactive", "-i", str(folder / "imgs"), "--gts", str(tmp_path / "nope"),
                   "-o", str(tmp_path / "o"), "--weights", str(tiny_export))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: ground-truth folder {tmp_path / 'nope'} does not exist"]
