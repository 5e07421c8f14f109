"""evaluate_folder / format_table / write_report: golden scores of the challenge script, problem cases, files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from mcp_medsam.evaluation.evaluate import EvaluationError, case_modality, evaluate_folder, format_table
from mcp_medsam.evaluation.report import metrics_chart, timing_chart, write_report

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GTS = SHARED / "data" / "sample" / "gts"
REFERENCE = SHARED / "reference"
needs_shared = pytest.mark.skipif(not GTS.is_dir(), reason="../shared (sample data) is absent")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", params=["golden", "litemedsam_official"])
def scored(request):
    """(evaluation of one reference segs folder, the challenge script's per-case output)."""
    if not GTS.is_dir():
        pytest.skip("../shared (sample data) is absent")
    ref = REFERENCE / request.param
    expected = json.loads((ref / "segs_metrics.json").read_text())
    return evaluate_folder(ref / "segs", GTS), expected


@needs_shared
def test_matches_the_challenge_script_per_case(scored):
    result, expected = scored
    assert not result.problems
    assert sorted(c.case for c in result.cases) == sorted(expected["cases"])
    # The challenge script rounds to 4 decimals; every case also reaches its NSD branch or the
    # DSC gate the same way (e.g. Fundus_DRIVE_21 with DSC < 0.2 -> NSD 0).
    for c in result.cases:
        want = expected["cases"][c.case]
        assert c.status == "ok"
        assert abs(c.dsc - want["dsc"]) <= 1e-3, c.case
        assert abs(c.nsd - want["nsd"]) <= 1e-3, c.case
    assert abs(result.case_mean_dsc - expected["mean_dsc"]) <= 1e-3
    assert abs(result.case_mean_nsd - expected["mean_nsd"]) <= 1e-3


@needs_shared
def test_overall_is_the_mean_of_modality_means(scored):
    result, _ = scored
    assert len(result.modalities) == 10 and sum(m.n for m in result.modalities) == 25
    assert [m.modality for m in result.modalities][:2] == ["CT", "MR"]  # official category order
    assert "Mammography" in [m.modality for m in result.modalities]  # "Mammo" canonicalised
    means = np.array([[m.dsc, m.nsd] for m in result.modalities])
    assert (result.dsc, result.nsd) == pytest.approx(tuple(means.mean(axis=0)))
    assert (result.dsc_std, result.nsd_std) == pytest.approx(tuple(means.std(axis=0)))
    for m in result.modalities:
        rows = [c for c in result.cases if c.modality == m.modality]
        assert m.n == len(rows) and m.dsc == pytest.approx(np.mean([c.dsc for c in rows]))


def test_case_modality():
    assert case_modality("2DBox_Mammo_DDSM_x.npz") == "Mammography"
    assert case_modality("3DBox_CT_STS_STS-001.npz") == "CT"
    assert case_modality("2DBox_Hologram_src_1.npz") == "Hologram"  # unknown: the raw token


@pytest.fixture()
def problem_folders(tmp_path):
    """gts/segs with one good, one missing, one misshaped and one unreadable prediction, one
    prediction without a gt, and a gt of an unknown modality."""
    if not GTS.is_dir():
        pytest.skip("../shared (sample data) is absent")
    gts, segs = tmp_path / "gts", tmp_path / "segs"
    gts.mkdir()
    segs.mkdir()
    good, missing = "2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz", "3DBox_MR_MSDHippocampus_001.npz"
    misshaped, unreadable = "3DBox_PET_STS_STS-002.npz", "2DBox_US_HC18_000.npz"
    for name in (good, missing, misshaped, unreadable):
        shutil.copy(GTS / name, gts / name)
    shutil.copy(REFERENCE / "golden" / "segs" / good, segs / good)
    seg = np.load(REFERENCE / "golden" / "segs" / misshaped)["segs"]
    np.savez_compressed(segs / misshaped, segs=seg[:, :-1])
    (segs / unreadable).write_bytes(b"not an npz")
    np.savez_compressed(segs / "2DBox_CT_orphan_1.npz", segs=np.zeros((4, 4), np.uint8))
    unknown = "2DBox_Hologram_src_1.npz"
    gt = np.zeros((20, 20), np.uint8)
    gt[5:10, 5:12] = 1
    np.savez_compressed(gts / unknown, gts=gt)
    np.savez_compressed(segs / unknown, segs=gt)
    names = dict(good=good, missing=missing, misshaped=misshaped, unreadable=unreadable, unknown=unknown)
    return tmp_path, names


def test_problem_cases_score_zero_and_are_listed(problem_folders):
    root, names = problem_folders
    timing = root / "timing.csv"
    timing.write_text("case,seconds,boxes,slices,status,message\n"
                      f"{names['good']},1.500,1,0,ok,\n"
                      f"{names['unknown']},0.500,1,0,ok,\n"
                      f"{names['misshaped']},9.000,1,48,ok,\n"
                      f"{names['missing']},2.000,2,35,failed,out of memory\n")
    result = evaluate_folder(root / "segs", root / "gts", csv_path=root / "out" / "cases.csv",
                             report_dir=root / "report", timing_csv=timing)
    rows = {c.case: c for c in result.cases}
    assert len(rows) == 5
    expected = json.loads((REFERENCE / "golden" / "segs_metrics.json").read_text())["cases"][names["good"]]
    assert rows[names["good"]].status == "ok"
    assert rows[names["good"]].dsc == pytest.approx(expected["dsc"], abs=1e-3)
    assert rows[names["unknown"]].modality == "Hologram" and rows[names["unknown"]].dsc == 1.0
    for key in ("missing", "misshaped", "unreadable"):
        row = rows[names[key]]
        assert (row.status, row.dsc, row.nsd) == (key, 0.0, 0.0)
        assert any(p.startswith(f"{key}: {names[key]}") for p in result.problems)
    assert any("no gt for prediction: 2DBox_CT_orphan_1.npz" in p for p in result.problems)
    mr = next(m for m in result.modalities if m.modality == "MR")
    assert (mr.n, mr.dsc, mr.nsd) == (1, 0.0, 0.0)  # a missing prediction counts, as 0

    with open(root / "out" / "cases.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case", "modality", "dsc", "nsd", "status"]
    assert [r["case"] for r in table] == sorted(rows)
    by_case = {r["case"]: r for r in table}
    assert by_case[names["missing"]]["status"] == "missing" and float(by_case[names["missing"]]["dsc"]) == 0.0
    assert float(by_case[names["good"]]["nsd"]) == pytest.approx(rows[names["good"]].nsd, abs=1e-6)
    assert by_case[names["misshaped"]]["modality"] == "PET"
    assert not list((root / "out").glob(".*"))  # no temporary files left behind

    text = format_table(result)
    for key in ("missing", "misshaped", "unreadable"):
        assert f"{key}: {names[key]}" in text
    assert "overall" in text and "Hologram" in text and "seconds per case" in text

    timing_rows = {t.modality: t for t in result.timing}
    assert (timing_rows["MR"].n, timing_rows["MR"].failed) == (0, 1)  # failed cases are not timed
    assert timing_rows["PET"].mean_s == pytest.approx(9.0)

    # The charts: PNGs that decode, at the figure's size (640 x 470 pixels at least, wider per modality),
    # with bars in the series' colours (matplotlib's tab:blue / tab:orange / tab:green, BGR here).
    for png, colours in (("metrics.png", [(180, 119, 31), (14, 127, 255)]), ("timing.png", [(44, 160, 44)])):
        data = (root / "report" / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        fig = metrics_chart(result) if png == "metrics.png" else timing_chart(result.timing)
        w, h = (fig.get_size_inches() * fig.dpi).round().astype(int)
        assert img.shape == (h, w, 3) and h == 470 and w >= 640, (png, img.shape)
        for bgr in colours:
            assert (np.abs(img.astype(int) - bgr).max(axis=2) <= 2).sum() > 100, (png, bgr)
    page = (root / "report" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<table") == 3 and 'src="metrics.png"' in page and 'src="timing.png"' in page
    assert names["misshaped"] in page
    assert all(f"<td>{m.modality}</td>" in page for m in result.modalities)  # every modality, by name


def test_report_without_timing(problem_folders, tmp_path):
    root, _ = problem_folders
    result = evaluate_folder(root / "segs", root / "gts")
    written = write_report(result, tmp_path / "r")
    assert [p.name for p in written] == ["metrics.png", "report.html"]
    assert not (tmp_path / "r" / "timing.png").exists()
    assert "timing.png" not in (tmp_path / "r" / "report.html").read_text()


def test_no_gts_or_segs_folder(tmp_path):
    (tmp_path / "gts").mkdir()
    with pytest.raises(EvaluationError):
        evaluate_folder(tmp_path, tmp_path / "gts")
    np.savez_compressed(tmp_path / "gts" / "2DBox_CT_a_1.npz", gts=np.ones((3, 3), np.uint8))
    with pytest.raises(EvaluationError):
        evaluate_folder(tmp_path / "nope", tmp_path / "gts")
