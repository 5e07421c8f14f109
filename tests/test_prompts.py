"""The one prompt module: boxes, grid, crops, propagation, jitter and the decoder feed.

Golden checks use ../shared/reference/golden/module_io.npz (the official crops and grid boxes);
the propagation and clipping rules are checked against the official pipeline's rule as written in
its infer.py (crop box = mask box +-3 px clipped to [0, W] x [0, H]; grid box +-3 clipped to [0, 256]).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mcp_medsam import preprocess, prompts
from mcp_medsam.errors import InputError
from mcp_medsam.manifest import bundled_weights, load_manifest


def test_content_crops_match_golden(module_io):
    crops = prompts.content_crops(module_io["image_uint8"], module_io["boxes_orig"], 64)
    np.testing.assert_allclose(crops, module_io["crops_64"], atol=1e-6, rtol=0)


def test_boxes_to_grid_match_golden(module_io):
    grid = np.stack([prompts.box_to_grid(b, 256, 256, 256) for b in module_io["boxes_orig"]])
    np.testing.assert_array_equal(grid, module_io["boxes_256"][:, 0])


def test_box_scaling_truncates():
    # 1000 px -> 256: 999 * 0.256 = 255.74 -> 255; 3 * 0.256 = 0.768 -> 0.
    np.testing.assert_array_equal(prompts.box_to_grid(np.array([3, 10, 999, 500]), 500, 1000, 256), [0, 2, 255, 128])


def test_crop_box_is_official_and_never_empty():
    img = np.arange(100 * 80 * 3, dtype=np.uint8).reshape(100, 80, 3)
    np.testing.assert_array_equal(prompts.crop_box(img, np.array([10, 20, 30, 50])), img[20:50, 10:30])
    assert prompts.crop_box(img, np.array([5, 5, 5, 9])).shape == (4, 1, 3)  # zero width -> one column
    assert prompts.crop_box(img, np.array([79, 99, 79, 99])).shape == (1, 1, 3)
    np.testing.assert_array_equal(prompts.crop_box(img, np.array([70, 90, 80, 100])), img[90:100, 70:80])


def test_mask_box_on_grid_follows_the_mask_on_the_resized_grid():
    mask = np.zeros((30, 27), bool)
    mask[10:14, 5:9] = True  # rows 10..13, cols 5..8
    nh, nw = preprocess.resized_shape(30, 27, 256)
    box = prompts.mask_box_on_grid(mask, np.array([5, 10, 8, 13]), (nh, nw), 256)
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_AREA)
    ys, xs = np.nonzero(small)
    np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max(), ys.max()])
    assert box[2] > prompts.box_to_grid(np.array([8]), 30, 27, 256)[0]  # beyond the truncated corner


def _official_crop_box(mask: np.ndarray, margin: int = 3) -> list[int]:
    """infer.py's propagated crop box: the mask's box +-margin, clipped to [0, W] and [0, H]."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    return [max(0, xs.min() - margin), max(0, ys.min() - margin), min(w, xs.max() + margin), min(h, ys.max() + margin)]


@pytest.mark.parametrize("rows,cols", [(slice(40, 60), slice(30, 50)),  # inside
                                       (slice(95, 100), slice(75, 80)),  # touching the bottom-right corner
                                       (slice(0, 2), slice(0, 3))])  # touching the top-left corner
def test_propagated_crop_box_is_the_official_clipping(rows, cols):
    mask = np.zeros((100, 80), bool)
    mask[rows, cols] = True
    new_hw = preprocess.resized_shape(100, 80, 256)
    crop, grid = prompts.propagated_prompt(mask, new_hw, 256, 3)
    assert crop.tolist() == _official_crop_box(mask)
    assert crop.dtype == np.int64 and grid.dtype == np.float32
    g = prompts.mask_box_on_grid(mask, prompts.tight_box(mask), new_hw, 256)
    np.testing.assert_array_equal(grid, np.clip(g + [-3, -3, 3, 3], 0, 256))
    # A box reaching the right edge includes the last column in its crop (x1 = W, exclusive end).
    if cols.stop == 80:
        assert crop[2] == 80 and prompts.crop_box(np.zeros((100, 80)), crop).shape[1] == 80 - crop[0]


def test_jitter_moves_sides_outward_scaled_and_clipped():
    h, w, s = 500, 1000, 256  # scale: 1000 / 256 = 3.906 original px per grid px
    grid = np.array([100, 50, 150, 80], np.float32)
    crop = np.array([390, 195, 586, 312])
    g, c = prompts.jitter_box(grid, crop, np.array([2, 0, -1, 3]), hw=(h, w), size=s)
    np.testing.assert_array_equal(g, [98, 50, 149, 83])
    d = np.rint(np.array([2, 0, -1, 3]) * w / s).astype(int)
    np.testing.assert_array_equal(c, [390 - d[0], 195 - d[1], 586 + d[2], 312 + d[3]])
    # Clipped to the grid [0, S] and the image [0, W] x [0, H]; never thinner than one pixel.
    g, c = prompts.jitter_box(np.array([1, 1, 255, 120], np.float32), np.array([3, 3, 998, 470]),
                              np.array([5, 5, 5, 5]), hw=(h, w), size=s)
    np.testing.assert_array_equal(g, [0, 0, 256, 125])
    assert c.tolist() == [0, 0, 1000, 490]
    g, c = prompts.jitter_box(np.array([10, 10, 12, 12], np.float32), np.array([39, 39, 47, 47]),
                              np.array([-5, -5, -5, -5]), hw=(h, w), size=s)
    assert g[2] >= g[0] + 1 and g[3] >= g[1] + 1 and c[2] >= c[0] + 1 and c[3] >= c[1] + 1


def test_check_boxes_clips_and_names_the_bad_box():
    np.testing.assert_array_equal(prompts.check_boxes(np.array([[-5, 2, 200, 40]]), (100, 50)), [[0, 2, 99, 40]])
    np.testing.assert_array_equal(prompts.check_boxes(np.array([1.4, 2.6, 10.5, 20.0]), (100, 50)), [[1, 3, 10, 20]])
    assert prompts.check_boxes(np.zeros((0, 6)), (10, 10, 10)).shape == (0, 6)
    for raw, msg in (([[10, 5, 3, 20]], "box 1 .* inverted"), ([[1, 1, 5, 5], [4, 4, 4, 9]], "box 2 .* empty"),
                     ([[200, 1, 260, 5]], "wholly outside"), ([[np.nan, 1, 2, 3]], "NaN"),
                     ([[1, 2, 3]], r"needs \(N, 4\)")):
        with pytest.raises(InputError, match=msg):
            prompts.check_boxes(np.array(raw, dtype=float), (100, 50))
    with pytest.raises(InputError, match="z_min > z_max"):
        prompts.check_boxes(np.array([[1, 1, 9, 5, 5, 2]]), (10, 10, 10))


def test_covered_slices_and_label_dtype():
    assert prompts.covered_slices(np.array([[0, 0, 2, 5, 5, 4], [0, 0, 4, 5, 5, 6], [0, 0, 9, 5, 5, 9]])) == 6
    assert prompts.label_dtype(255) == np.uint8 and prompts.label_dtype(256) == np.uint16


def test_decoder_feed_has_the_graph_inputs():
    inputs = load_manifest(bundled_weights()).graphs["decoder"].inputs
    # The bundled per-box graph has its constant crop CNN folded away: no crops input, none fed.
    crops = np.zeros((2, 3, 64, 64)) if "crops" in inputs else None
    feed = prompts.decoder_feed(embeddings=np.zeros((1, 256, 64, 64)), embedding_index=[0, 0],
                                boxes=np.zeros((2, 4)), crops=crops, modality_index=[1, 1])
    assert set(feed) == set(inputs)
    for name, spec in inputs.items():
        assert feed[name].dtype == np.dtype(spec.dtype), name
        assert feed[name].ndim == len(spec.shape), name
