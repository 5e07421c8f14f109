"""Torch-free preprocessing against the golden arrays and against torch's own resampling (prompt
geometry: tests/test_prompts.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcp_medsam import preprocess as pp
from mcp_medsam.errors import InputError


def test_encoder_input_matches_golden(module_io):
    x, new_hw = pp.encoder_input(module_io["image_uint8"], 256)
    assert new_hw == (256, 256)
    np.testing.assert_array_equal(x, module_io["image"][0])


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


def test_check_image_converts_and_refuses_with_a_reason():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(pp.check_image(grey, volume=False), np.repeat(grey[:, :, None], 3, axis=2))
    assert pp.check_image(grey.astype(np.float64), volume=False).dtype == np.uint8
    with pytest.raises(InputError, match="0..255"):
        pp.check_image(np.full((3, 4), 300.0), volume=False)
    with pytest.raises(InputError, match="NaN"):
        pp.check_image(np.full((3, 4), np.nan), volume=False)
    with pytest.raises(InputError, match=r"needs \(D, H, W\)"):
        pp.check_image(grey, volume=True)
    with pytest.raises(InputError, match="dtype bool"):
        pp.check_image(np.zeros((3, 4), bool), volume=False)
