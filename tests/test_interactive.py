"""Click rounds: the CVPR 2025 keys through `mcp-medsam predict` (2D and 3D), the 3D refine rule, hostile clicks.

Runs on the tiny export (it takes point prompts); the click rule itself: tests/test_clicks.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import SAMPLE, need, run_cli, segs_of, write_case
from mcp_medsam import InputError, Segmenter
from mcp_medsam.batch import segment_case
from mcp_medsam.io.npz import load_case

CASE_2D = "2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz"
CASE_3D = "3DBox_MR_MSDHippocampus_001.npz"


def _sample(name):
    with np.load(need(SAMPLE / "imgs" / name)) as d:
        return d["imgs"], d["boxes"]


def _cvpr25_boxes(boxes):
    return [{"z_min": int(b[2]), "z_max": int(b[5]), "z_mid": int((b[2] + b[5]) // 2), "z_mid_x_min": int(b[0]),
             "z_mid_y_min": int(b[1]), "z_mid_x_max": int(b[3]), "z_mid_y_max": int(b[4])} for b in boxes]


def _clicks_3d(boxes):
    """Per box: a fg click on its middle slice, then a bg click two slices up; as the challenge writes them
    (z, y, x lists, numpy int64 values) with their order, and the same as API points (x, y, z)."""
    clicks, order, points, labels = [], [], [], []
    for b in boxes:
        z = int((b[2] + b[5]) // 2)
        fg = [np.int64(z), np.int64((b[1] + b[4]) // 2), np.int64((b[0] + b[3]) // 2)]
        bg = [np.int64(z + 2), np.int64(b[1]), np.int64(b[0])]
        clicks.append({"fg": [fg], "bg": [bg]})
        order.append(["fg", "bg"])
        points.append([[int(v) for v in fg[::-1]], [int(v) for v in bg[::-1]]])
        labels.append([1, 0])
    return clicks, order, np.array(points), np.array(labels)


def test_2d_click_round_through_predict_equals_the_api(tiny, tiny_export, tmp_path):
    imgs, boxes = _sample(CASE_2D)
    b = boxes[0]
    yx_fg = [int((b[1] + b[3]) // 2), int((b[0] + b[2]) // 2)]
    yx_bg = [int(b[1]) + 2, int(b[0]) + 2]
    write_case(tmp_path / "in", CASE_2D, imgs=imgs, boxes=boxes,
               clicks=np.array([{"fg": [yx_fg], "bg": [yx_bg]}], dtype=object),
               clicks_order=np.array([["bg", "fg"]]), prev_pred=np.zeros(imgs.shape[:2], np.uint8))
    proc = run_cli("predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(tiny_export),
                   "--threads", "1")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    got = segs_of(tmp_path / "out")[CASE_2D]
    api = tiny.segment_image(imgs, boxes, "XRay", points=[[yx_bg[::-1], yx_fg[::-1]]], point_labels=[[0, 1]])
    np.testing.assert_array_equal(got, api)
    assert not np.array_equal(api, tiny.segment_image(imgs, boxes, "XRay"))  # the clicks act


def test_3d_click_round_through_predict_equals_the_api(tiny, tiny_export, tmp_path):
    imgs, boxes = _sample(CASE_3D)
    prev = tiny.segment_volume(imgs, boxes, "MR")  # the box round
    clicks, order, points, labels = _clicks_3d(boxes)
    name = "MR_Hippocampus_001.npz"  # the challenge's names have no 3DBox_ prefix
    write_case(tmp_path / "in", name, imgs=imgs, spacing=np.ones(3), boxes=np.array(_cvpr25_boxes(boxes), dtype=object),
               clicks=np.array(clicks, dtype=object), clicks_order=np.array(order), prev_pred=prev)
    proc = run_cli("predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(tiny_export),
                   "--threads", "1")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    got = segs_of(tmp_path / "out")[name]
    api = tiny.refine_volume(imgs, boxes, "MR", points=points, point_labels=labels, prev=prev)
    np.testing.assert_array_equal(got, api)
    assert not np.array_equal(api, prev)


def test_refine_rule(tiny):
    imgs, boxes = _sample(CASE_3D)
    cache = tiny.slice_cache(64)
    box_round = tiny.segment_volume(imgs, boxes, "MR", cache=cache)
    none = np.zeros((len(boxes), 1, 3), np.int64), np.full((len(boxes), 1), -1)
    # No clicks: the box round.
    np.testing.assert_array_equal(tiny.refine_volume(imgs, boxes, "MR", points=none[0], point_labels=none[1],
                                                     cache=cache), box_round)
    np.testing.assert_array_equal(tiny.refine_volume(imgs, boxes, "MR", points=None, point_labels=None, cache=cache),
                                  box_round)
    # A click on a box's own slice (z_mid): that slice is what the 2D call gives with the box and the click.
    b = boxes[0]
    z = int((b[2] + b[5]) // 2)
    xy = [int(b[0]) + 1, int(b[1]) + 1]
    pts = np.zeros((len(boxes), 1, 3), np.int64)
    lab = np.full((len(boxes), 1), -1)
    pts[0, 0], lab[0, 0] = [*xy, z], 0
    one = tiny.refine_volume(imgs, boxes, "MR", points=pts, point_labels=lab, prev=box_round, cache=cache)
    alone = tiny.refine_volume(imgs, boxes[:1], "MR", points=pts[:1], point_labels=lab[:1], cache=cache)
    flat = tiny.segment_image(imgs[z], b[None, [0, 1, 3, 4]], "MR", points=[[xy]], point_labels=[[0]])
    np.testing.assert_array_equal(alone[z], flat)  # (box 2 overlaps box 1 in the two-box volume)
    assert not np.array_equal(one, box_round)
    # Without prev, the previous round is computed: the same result as given the box round.
    np.testing.assert_array_equal(tiny.refine_volume(imgs, boxes, "MR", points=pts, point_labels=lab, cache=cache),
                                  one)
    # A foreground click beyond the box's z range widens it: that slice gets segmented for the box.
    far = np.zeros((len(boxes), 1, 3), np.int64)
    far[1, 0], lab2 = [int((boxes[1, 0] + boxes[1, 3]) // 2), int((boxes[1, 1] + boxes[1, 4]) // 2),
                       int(boxes[1, 5]) + 2], np.array([[-1], [1]])
    wide = tiny.refine_volume(imgs, boxes, "MR", points=far, point_labels=lab2, prev=box_round, cache=cache)
    assert not (box_round[int(boxes[1, 5]) + 1:int(boxes[1, 5]) + 3] == 2).any()
    covered = [z for z in range(imgs.shape[0]) if (wide[z] == 2).any()]
    assert max(covered) >= int(boxes[1, 5]) + 1, covered
    with pytest.raises(InputError, match="prev has shape"):
        tiny.refine_volume(imgs, boxes, "MR", points=pts, point_labels=lab, prev=box_round[1:])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("clicks, order, message", [
    ([{"fg": [[1, 2]], "bg": []}], [["fg"]], r"clicks entry 1 fg click 1 is \[1, 2\]; expected 3 array indices"),
    ([{"fg": [[1, 2, 3]], "bg": []}], [["bg"]], r"clicks_order entry 1 \(bg\) does not match its clicks"),
    ([{"fg": [[1, 2, 99]], "bg": []}], [["fg"]], "clicks: point 1 of box 1 .* lies outside the image"),
    ([{"fg": [[1, 2, "3"]], "bg": []}], [["fg"]], "expected a number"),
    ([{"fg": [], "bg": []}, {"fg": [], "bg": []}], [[None], [None]], "clicks has 2 entries for 1 target"),
    ([{"pos": []}], [[None]], "expected a dict of fg and bg lists"),
    ([{"fg": [[1.5, 2, 3]], "bg": []}], [["fg"]], "whole numbers"),
])
def test_bad_clicks_get_one_clear_line(tiny_export, tmp_path, clicks, order, message):
    imgs = np.zeros((4, 20, 20), np.uint8)
    boxes = np.array(_cvpr25_boxes(np.array([[2, 2, 0, 10, 10, 3]])), dtype=object)
    path = write_case(tmp_path, "CT_bad.npz", imgs=imgs, boxes=boxes, clicks=np.array(clicks, dtype=object),
                      clicks_order=np.array(order, dtype=object))
    with pytest.raises(InputError, match=message):
        load_case(path)


def test_hostile_clicks_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    boxes = np.array(_cvpr25_boxes(np.array([[2, 2, 0, 10, 10, 3]])), dtype=object)
    path = write_case(tmp_path, "CT_evil.npz", imgs=np.zeros((4, 20, 20), np.uint8), boxes=boxes,
                      clicks=np.array([_Evil(marker)], dtype=object))
    with pytest.raises(InputError, match="clicks is a pickle that calls .*system; refused without running it"):
        load_case(path)
    assert not marker.exists()


def test_prev_pred_of_the_wrong_shape_is_a_note_and_clicks_without_order_too(tiny, tmp_path):
    imgs, boxes = _sample(CASE_3D)
    clicks, _, points, labels = _clicks_3d(boxes)
    path = write_case(tmp_path, "MR_noorder.npz", imgs=imgs, boxes=np.array(_cvpr25_boxes(boxes), dtype=object),
                      clicks=np.array(clicks, dtype=object), prev_pred=np.zeros((2, 2), np.uint8))
    case = load_case(path)
    assert case.prev is None and any("prev_pred" in n for n in case.notes)
    assert any("no clicks_order" in n for n in case.notes)
    np.testing.assert_array_equal(case.points, points)  # fg then bg, as the challenge's own order here
    np.testing.assert_array_equal(case.point_labels, labels)
    assert case.clicks == 2 * len(boxes)


def test_box_only_model_does_the_box_round_and_says_so(tmp_path):
    seg = Segmenter.load(threads=1)
    if seg.supports_points:
        pytest.skip("the bundled model takes point prompts")
    imgs, boxes = _sample(CASE_2D)
    path = write_case(tmp_path, CASE_2D, imgs=imgs, boxes=boxes,
                      clicks=np.array([{"fg": [[100, 100]], "bg": []}], dtype=object), clicks_order=np.array([["fg"]]))
    case = load_case(path)
    np.testing.assert_array_equal(segment_case(seg, case, "XRay"), seg.segment_image(imgs, boxes, "XRay"))
    assert any("clicks ignored" in n for n in case.notes)
