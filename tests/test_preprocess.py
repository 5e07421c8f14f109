"""Torch-free preprocessing against the golden arrays and against torch's own resampling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app import preprocess as pp


def test_encoder_input_matches_golden(module_io):
    x, new_hw = pp.encoder_input(module_io["image_uint8"], 256)
    assert new_hw == (256, 256)
    np.testing.assert_array_equal(x, module_io["image"][0])


def test_crops_match_golden(module_io):
    img = module_io["image_uint8"]
    crops = np.stack([pp.resize_aa(pp.crop_box(img, b), 64) for b in module_io["boxes_orig"]])
    np.testing.assert_allclose(crops, module_io["crops_64"], atol=1e-6, rtol=0)


def test_boxes_to_grid_match_golden(module_io):
    grid = np.stack([pp.box_to_grid(b, 256, 256, 256) for b in module_io["boxes_orig"]])
    np.testing.assert_array_equal(grid, module_io["boxes_256"][:, 0])


def test_box_scaling_truncates():
    # 1000 px -> 256: 999 * 0.256 = 255.74 -> 255; 3 * 0.256 = 0.768 -> 0.
    np.testing.assert_array_equal(pp.box_to_grid(np.array([3, 10, 999, 500]), 500, 1000, 256), [0, 2, 255, 128])


@pytest.mark.parametrize("h,w,size", [(10, 10, 64), (100, 10, 64), (63, 65, 64), (128, 128, 64), (300, 301, 224),
                                      (5, 7, 224), (1, 1, 64), (700, 20, 224), (2, 3, 64)])
def test_antialiased_resize_matches_torch(h, w, size):
    """torchvision Resize(antialias=True) on a [0, 1] tensor == F.interpolate(antialias=True)."""
    img = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, (size, size), mode="bilinear",
                        align_corners=False, antialias=True)[0].numpy()
    # torch accumulates in float32 in a different order: ~1e-5 on [0, 1] values for large downscales.
    np.testing.assert_allclose(pp.resize_aa(img, size), ref, atol=3e-5, rtol=0)


@pytest.mark.parametrize("h,w", [(574, 765), (960, 480), (51, 35), (1024, 1344), (256, 256), (27, 30)])
def test_encoder_resize_rule(h, w):
    nh, nw = pp.resized_shape(h, w, 256)
    assert max(nh, nw) == 256
    assert (nh, nw) == (int(h * 256 / max(h, w) + 0.5), int(w * 256 / max(h, w) + 0.5))
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x, _ = pp.encoder_input(img, 256)
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float64)
    np.testing.assert_allclose(x[:, :nh, :nw], ((small - small.min()) / (small.max() - small.min())).transpose(2, 0, 1),
                               atol=1e-7)
    assert not x[:, nh:, :].any() and not x[:, :, nw:].any()


@pytest.mark.parametrize("h,w", [(574, 765), (1024, 1344), (51, 35), (27, 30), (512, 512)])
def test_postprocess_matches_torch_bilinear(h, w):
    nh, nw = pp.resized_shape(h, w, 256)
    logits = np.random.default_rng(1).normal(0, 5, (256, 256)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(logits)[None, None, :nh, :nw], (h, w), mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    got = pp.postprocess_logits(logits, (nh, nw), (h, w))
    # Only pixels whose logit is within OpenCV-vs-torch rounding of 0 may differ.
    differ = got != (ref > 0)
    assert np.all(np.abs(ref[differ]) < 1e-3)


def test_crop_box_is_official_and_never_empty():
    img = np.arange(100 * 80 * 3, dtype=np.uint8).reshape(100, 80, 3)
    np.testing.assert_array_equal(pp.crop_box(img, np.array([10, 20, 30, 50])), img[20:50, 10:30])
    assert pp.crop_box(img, np.array([5, 5, 5, 9])).shape == (4, 1, 3)  # zero width -> one column
    assert pp.crop_box(img, np.array([79, 99, 79, 99])).shape == (1, 1, 3)


def test_mask_box_on_grid_follows_the_mask_on_the_resized_grid():
    mask = np.zeros((30, 27), bool)
    mask[10:14, 5:9] = True  # rows 10..13, cols 5..8
    nh, nw = pp.resized_shape(30, 27, 256)
    box = pp.mask_box_on_grid(mask, np.array([5, 10, 8, 13]), (nh, nw), 256)
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_AREA)
    ys, xs = np.nonzero(small)
    np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max(), ys.max()])
    assert box[2] > pp.box_to_grid(np.array([8]), 30, 27, 256)[0]  # beyond the truncated corner
