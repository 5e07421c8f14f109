"""Click prompts in the array API: validation, geometry on the grid, and what a box-only model says.

Point prompts through a model that takes them: tests/test_interactive.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from mcp_medsam import InputError, Segmenter
from mcp_medsam import prompts


@pytest.mark.parametrize("points, labels, message", [
    (np.zeros((1, 2, 3)), np.ones((1, 2)), r"need \(N=1, P, 2\)"),
    (np.zeros((1, 2, 2)), np.ones((1, 3)), "point_labels has shape"),
    (np.array([[[np.nan, 1]]]), np.ones((1, 1)), "NaN"),
    (np.array([[[1.5, 1]]]), np.ones((1, 1)), "whole numbers"),
    (np.array([[[1, 1]]]), np.array([[2]]), r"holds \[2\]"),
    (np.array([[[10, 1]]]), np.ones((1, 1)), r"point 1 of box 1 \(x=10, y=1\) lies outside the image \(size 10x8\)"),
    (np.array([[[1, -1]]]), np.ones((1, 1)), "outside"),
    (np.array([[[1, 1]]], dtype=object), np.ones((1, 1)), "dtype object"),
])
def test_bad_points_are_named(points, labels, message):
    with pytest.raises(InputError, match=message):
        prompts.check_points(points, labels, 1, (10, 8))


def test_padding_points_are_ignored_wherever_they_are():
    pts, lab = prompts.check_points(np.array([[[3, 4], [99, -5]]]), np.array([[1, -1]]), 1, (10, 8))
    assert pts.tolist() == [[[3, 4], [0, 0]]] and lab.tolist() == [[1, -1]]
    pts, lab = prompts.check_points(np.array([[1, 2, 3]]), np.array([0]), 1, (4, 4, 4))  # (P, 3) for one 3D box
    assert pts.shape == (1, 1, 3) and lab.tolist() == [[0]]


def test_points_land_on_their_pixel_centres_on_the_grid():
    # 512 px -> 256: pixel c covers grid [c/2, c/2 + 0.5); its centre (c + 0.5) / 2 is 0.5 past the value given
    # (the graph adds 0.5 as for box corners).
    got = prompts.points_to_grid(np.array([[0, 0], [511, 100]]), 300, 512, 256)
    np.testing.assert_allclose(got, [[-0.25, -0.25], [255.25, 49.75]])
    assert got.dtype == np.float32


def test_pad_points_pads_with_label_minus_one():
    pts, lab = prompts.pad_points([np.array([[1, 2], [3, 4]]), np.zeros((0, 2))], [np.array([1, 0]), np.zeros(0)])
    assert pts.shape == (2, 2, 2) and lab.tolist() == [[1, 0], [-1, -1]]
    pts, lab = prompts.pad_points([np.zeros((0, 2))], [np.zeros(0)])
    assert pts.shape == (1, 1, 2) and lab.tolist() == [[-1]]  # a slot even without points


def test_feed_carries_clicks_by_the_graphs_names():
    feed = prompts.decoder_feed(embeddings=np.zeros((1, 2, 4, 4)), embedding_index=np.zeros(1), boxes=np.zeros((1, 4)),
                                crops=np.zeros((1, 3, 4, 4)), modality_index=np.zeros(1), points=np.ones((1, 2, 2)),
                                point_labels=np.array([[1, -1]]))
    assert feed["point_coords"].dtype == np.float32 and feed["point_labels"].tolist() == [[1.0, -1.0]]
    assert feed["point_labels"].dtype == np.float32


def test_box_grows_to_take_in_foreground_clicks_only_when_there_are_some():
    crop, grid = np.array([10, 10, 20, 20]), np.array([5.0, 5.0, 10.0, 10.0], np.float32)
    same = prompts.box_with_points(crop, grid, np.zeros((0, 2)), (40, 40), 20, 3)
    assert same[0] is crop and same[1] is grid
    c, g = prompts.box_with_points(crop, grid, np.array([[30, 12]]), (40, 40), 20, 3)
    assert c.tolist() == [10, 9, 34, 20]  # x1 = 30 + 1 + 3 (crop ends are exclusive), y0 = 12 - 3
    np.testing.assert_allclose(g, [5, 5.75 - 3, 14.75 + 3, 10])  # the click at grid (14.75, 5.75), +-3


def test_box_only_model_refuses_clicks_clearly():
    seg = Segmenter.load(threads=1)  # the bundled default
    if seg.supports_points:
        pytest.skip("the bundled model takes point prompts")
    img = np.zeros((32, 32), np.uint8)
    with pytest.raises(InputError, match="clicks need a model with point prompts"):
        seg.segment_image(img, [[2, 2, 20, 20]], "CT", points=[[[5, 5]]], point_labels=[[1]])
    with pytest.raises(InputError, match="clicks need a model with point prompts"):
        seg.refine_volume(np.zeros((3, 32, 32), np.uint8), [[2, 2, 0, 20, 20, 2]], "CT", points=[[[5, 5, 1]]],
                          point_labels=[[1]])
    with pytest.raises(InputError, match="go together"):
        seg.segment_image(img, [[2, 2, 20, 20]], "CT", points=[[[5, 5]]])
