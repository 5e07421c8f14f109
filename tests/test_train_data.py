"""Training data: both CVPR24 layouts, the cached index, modality errors, the split by case."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mcp_medsam_torch.train import data as data_mod
from mcp_medsam_torch.train.data import CaseReader, DataError, build_index, find_case_files, split_by_case

from conftest import SAMPLE
pytestmark = pytest.mark.skipif(not (SAMPLE / "imgs").is_dir(), reason="sample data missing")


def _training_layout(tmp: Path, names: list[str]) -> Path:
    """Merge imgs + gts of some sample cases into single npz files under a sub-folder."""
    root = tmp / "train" / "sub"
    root.mkdir(parents=True)
    for n in names:
        with np.load(SAMPLE / "imgs" / n) as a, np.load(SAMPLE / "gts" / n) as g:
            np.savez_compressed(root / n, imgs=a["imgs"], gts=g["gts"])
    return tmp / "train"


def test_validation_layout_index_matches_the_arrays(tmp_path: Path) -> None:
    index = build_index([SAMPLE], cache_path=tmp_path / "index.json")
    assert len(index.cases) == 25
    assert {c.modality for c in index.cases} == {"CT", "MR", "PET", "XRay", "US", "Mammography", "Endoscopy",
                                                 "Fundus", "Dermoscopy", "Microscopy"}
    rec = next(c for c in index.cases if c.name == "3DBox_MR_MSDHippocampus_001.npz")
    with np.load(rec.gt_path) as g:
        gts = g["gts"]
    assert rec.ndim == 3 and rec.shape == gts.shape
    assert list(rec.slices) == [z for z in range(gts.shape[0]) if gts[z].any()]
    for z, labels in zip(rec.slices, rec.labels):
        assert labels == tuple(int(v) for v in np.unique(gts[z]) if v)
    micro = next(c for c in index.cases if c.name == "2DBox_Microscopy_NIH3T3_dna-26.npz")
    assert micro.slices == (0,) and micro.labels[0] == tuple(range(1, 56))


def test_training_layout_gives_the_same_records(tmp_path: Path) -> None:
    names = ["2DBox_US_HC18_000.npz", "3DBox_PET_STS_STS-002.npz"]
    root = _training_layout(tmp_path, names)
    assert [p[0].name for p in find_case_files([root])] == sorted(names)
    a = {c.name: c for c in build_index([root]).cases}
    b = {c.name: c for c in build_index([SAMPLE]).cases if c.name in names}
    for n in names:
        assert (a[n].slices, a[n].labels, a[n].shape, a[n].token) == (b[n].slices, b[n].labels, b[n].shape, b[n].token)
        assert a[n].image_path == a[n].gt_path


def test_index_cache_is_reused_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _training_layout(tmp_path, ["2DBox_US_HC18_000.npz", "2DBox_US_HC18_001.npz"])
    cache = tmp_path / "out" / "data_index.json"
    first = build_index([root], cache_path=cache)
    assert cache.is_file()
    scanned: list[str] = []
    real = data_mod._scan_case
    monkeypatch.setattr(data_mod, "_scan_case", lambda img, gt: scanned.append(img.name) or real(img, gt))
    assert build_index([root], cache_path=cache) == first
    assert scanned == []  # nothing reread
    f = root / "sub" / "2DBox_US_HC18_001.npz"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    build_index([root], cache_path=cache)
    assert scanned == ["2DBox_US_HC18_001.npz"]


def test_unknown_modality_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    np.savez(root / "2DBox_Ultrasound_x_1.npz", imgs=np.zeros((8, 8, 3), np.uint8), gts=np.ones((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"2DBox_Ultrasound_x_1\.npz.*unknown modality 'Ultrasound'"):
        build_index([root])


def test_grey_2d_and_missing_gts(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    gt = np.zeros((20, 30), np.uint8)
    gt[5:9, 4:12] = 1
    np.savez(root / "2DBox_XRay_grey_1.npz", imgs=np.full((20, 30), 7, np.uint8), gts=gt)
    (rec,) = build_index([root]).cases
    img, g = CaseReader().slice(rec, 0)
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8 and (g == gt).all()
    val = tmp_path / "v"
    (val / "imgs").mkdir(parents=True)
    (val / "gts").mkdir()
    shutil.copy(root / "2DBox_XRay_grey_1.npz", val / "imgs")
    with pytest.raises(DataError, match="no ground truth"):
        build_index([val])


def test_split_is_by_case_deterministic_and_stratified() -> None:
    index = build_index([SAMPLE])
    train, val = split_by_case(index, val_fraction=0.3, seed=0)
    assert (train, val) == split_by_case(index, val_fraction=0.3, seed=0)
    assert sorted(train + val) == list(range(len(index.cases))) and not set(train) & set(val)
    for cat in {c.category for c in index.cases}:
        ids = [i for i, c in enumerate(index.cases) if c.category == cat]
        assert any(i in train for i in ids)  # every modality stays in training
        if len(ids) >= 2:
            assert any(i in val for i in ids)
    # Independent of the order of the folders / cases.
    rev = index.subset(reversed(range(len(index.cases))))
    _, v2 = split_by_case(rev, val_fraction=0.3, seed=0)
    assert {rev.cases[i].name for i in v2} == {index.cases[i].name for i in val}
    assert split_by_case(index, val_fraction=0.0) == (list(range(len(index.cases))), [])
