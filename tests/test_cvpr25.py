"""The CVPR 2025 interactive 3D layout in predict: boxes as one dict per target (the box round).

A CVPR25 case written from a sample volume segments exactly as its CVPR24 twin when z_mid is the
middle slice; each box starts from its z_mid; a target without a box keeps the label numbering;
the pickled boxes member is read by a restricted unpickler that refuses anything but plain data.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import SAMPLE, need, run_cli
from mcp_medsam import InputError
from mcp_medsam.batch import segment_case
from mcp_medsam.io.npz import load_case

TWINS = ["3DBox_MR_MSDHippocampus_001.npz", "3DBox_CT_STS_STS-001.npz"]


def cvpr25_boxes(boxes: np.ndarray, z_mid=None) -> list[dict | None]:
    """(N, 6) CVPR24 boxes -> the CVPR25 list of dicts, values as numpy int64 (as the challenge's get_boxes.py)."""
    out = []
    for i, (x0, y0, z0, x1, y1, z1) in enumerate(np.asarray(boxes, np.int64)):
        mid = (z0 + z1) // 2 if z_mid is None else z_mid[i]
        out.append({"z_min": np.int64(z0), "z_max": np.int64(z1), "z_mid": np.int64(mid), "z_mid_x_min": np.int64(x0),
                    "z_mid_y_min": np.int64(y0), "z_mid_x_max": np.int64(x1), "z_mid_y_max": np.int64(y1)})
    return out


def write_cvpr25(path, imgs, boxes, *, clicks=False, **extra) -> None:
    arrays = {"imgs": imgs, "spacing": np.array([1.0, 1.0, 1.0])}
    if boxes is not None:
        arrays["boxes"] = np.array(boxes, dtype=object)
    if clicks:  # as the challenge's later rounds write them: per target fg/bg lists of z-first voxel indices
        arrays["clicks"] = np.array([{"fg": [[1, 2, 3]], "bg": []} for _ in range(max(len(boxes or []), 1))],
                                    dtype=object)
        arrays["clicks_order"] = np.array([["fg"]], dtype=object)
        arrays["prev_pred"] = np.zeros(imgs.shape, np.uint8)
    np.savez_compressed(path, **arrays, **extra)


def test_cvpr25_case_segments_as_its_cvpr24_twin(tiny_export, tmp_path):
    """Through the real CLI: the CVPR25 file (name without the 3DBox_ prefix, as the challenge names
    them) gives the same segs as the CVPR24 file (click rounds: tests/test_interactive.py)."""
    v24, v25 = tmp_path / "cvpr24", tmp_path / "cvpr25"
    v24.mkdir()
    v25.mkdir()
    for name in TWINS:
        src = need(SAMPLE / "imgs" / name)
        shutil.copy(src, v24 / name)
        with np.load(src) as d:
            write_cvpr25(v25 / name.removeprefix("3DBox_"), d["imgs"], cvpr25_boxes(d["boxes"]))
    outs = {}
    for folder in (v24, v25):
        proc = run_cli("predict", "-i", str(folder), "-o", str(tmp_path / f"out-{folder.name}"),
                       "--weights", str(tiny_export), "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        outs[folder.name] = proc
    assert not [ln for ln in outs["cvpr25"].stderr.splitlines() if ": note: " in ln]
    for name in TWINS:
        twin = tmp_path / "out-cvpr25" / name.removeprefix("3DBox_")
        with np.load(tmp_path / "out-cvpr24" / name) as a, np.load(twin) as b:
            assert a["segs"].dtype == b["segs"].dtype and a["segs"].shape == b["segs"].shape
            assert a["segs"].any()
            np.testing.assert_array_equal(a["segs"], b["segs"], err_msg=name)


def test_each_box_starts_on_its_z_mid(tiny, tmp_path):
    """z_mid away from the middle: that slice is segmented with the given box (as a 2D image), and the
    whole volume equals segment_volume with that start."""
    with np.load(need(SAMPLE / "imgs" / TWINS[0])) as d:
        imgs, boxes = d["imgs"], d["boxes"]
    box = boxes[:1]
    z0, z1 = int(box[0, 2]), int(box[0, 5])
    z_mid = z0 + 1
    assert z_mid != (z0 + z1) // 2
    path = tmp_path / "MR_start.npz"
    write_cvpr25(path, imgs, cvpr25_boxes(box, z_mid=[z_mid]))
    case = load_case(path)
    assert case.layout == "cvpr25" and case.starts.tolist() == [z_mid]
    segs = segment_case(tiny, case, "MR")
    np.testing.assert_array_equal(segs, tiny.segment_volume(imgs, box, "MR", starts=[z_mid]))
    np.testing.assert_array_equal(segs[z_mid], tiny.segment_image(imgs[z_mid], box[:, [0, 1, 3, 4]], "MR"))
    middle = tiny.segment_volume(imgs, box, "MR")
    assert not np.array_equal(segs, middle)  # the start matters (the propagation differs)
    with pytest.raises(InputError, match="within its z range"):
        tiny.segment_volume(imgs, box, "MR", starts=[z1 + 1])


def test_a_target_without_a_box_keeps_the_label_numbering(tiny, tmp_path):
    with np.load(need(SAMPLE / "imgs" / TWINS[0])) as d:
        imgs, boxes = d["imgs"], d["boxes"]
    two = np.concatenate([boxes, boxes[:1] + [2, 2, 0, 2, 2, 0]])  # three targets, the second without a box
    listed = cvpr25_boxes(two)
    listed[1] = None
    path = tmp_path / "MR_gap.npz"
    write_cvpr25(path, imgs, listed)
    case = load_case(path)
    assert case.labels.tolist() == [1, 3] and case.targets == 3
    segs = segment_case(tiny, case, "MR")
    twin = tiny.segment_volume(imgs, two[[0, 2]], "MR")  # labels 1, 2 in box order
    expected = np.where(twin == 2, 3, twin).astype(np.uint8)
    assert set(np.unique(segs)) <= {0, 1, 3} and (segs == 3).any()
    np.testing.assert_array_equal(segs, expected)


def test_a_case_without_boxes_fails_with_a_clear_message(tmp_path):
    path = tmp_path / "CT_clicks_only.npz"
    write_cvpr25(path, np.zeros((4, 20, 20), np.uint8), None, clicks=True)
    with pytest.raises(InputError, match="no boxes: this case gives only clicks, and the model needs a box"):
        load_case(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_without_running(tmp_path, tiny_export):
    marker = tmp_path / "pwned"
    path = tmp_path / "CT_evil.npz"
    np.savez(path, imgs=np.zeros((4, 20, 20), np.uint8), boxes=np.array([_Evil(marker)], dtype=object))
    with pytest.raises(InputError, match=r"calls posix\.system; refused without running it"):
        load_case(path)
    assert not marker.exists()
    # Through the CLI as well: that case fails with the message, nothing is run, no traceback.
    inp = tmp_path / "in"
    inp.mkdir()
    path.rename(inp / path.name)
    proc = run_cli("predict", "-i", str(inp), "-o", str(tmp_path / "out"), "--weights", str(tiny_export),
                   "--threads", "1")
    assert proc.returncode == 1 and "refused without running it" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("boxes,message", [
    ([{"z_min": 0, "z_max": 3}], "boxes entry 1 lacks z_mid, z_mid_x_min"),
    ([{"z_min": 0, "z_max": 3, "z_mid": 5, "z_mid_x_min": 1, "z_mid_y_min": 1, "z_mid_x_max": 9,
       "z_mid_y_max": 9}], "z_mid 5 must be a slice of the volume (0..3) within z_min..z_max (0..3)"),
    ([{"z_min": 0, "z_max": 3, "z_mid": 1, "z_mid_x_min": "1", "z_mid_y_min": 1, "z_mid_x_max": 9,
       "z_mid_y_max": 9}], "z_mid_x_min is '1'; expected a number"),
    ([[1, 2, 3], [1]], "boxes entry 1 is a list"),
    ([[1, 2, 3]], "boxes is a pickled array of shape (1, 3)"),
    ([{"z_min": 2, "z_max": 1, "z_mid": 1, "z_mid_x_min": 1, "z_mid_y_min": 1, "z_mid_x_max": 9,
       "z_mid_y_max": 9}], "z_mid 1 must be a slice"),
])
def test_malformed_cvpr25_boxes(tmp_path, boxes, message):
    path = tmp_path / "CT_bad.npz"
    write_cvpr25(path, np.zeros((4, 20, 20), np.uint8), boxes)
    with pytest.raises(InputError) as err:
        load_case(path)
    assert message in str(err.value)


def test_an_empty_target_list_is_all_background(tiny, tmp_path):
    path = tmp_path / "CT_none.npz"
    write_cvpr25(path, np.zeros((4, 20, 20), np.uint8), [None, None], clicks=False)
    case = load_case(path)
    assert case.boxes.shape == (0, 6) and case.targets == 2 and not case.notes
    segs = segment_case(tiny, case, "CT")
    assert segs.shape == (4, 20, 20) and segs.dtype == np.uint8 and not segs.any()
