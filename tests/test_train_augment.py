"""One training sample: preprocessing as inference, flips, jitter, crops from the augmented image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mcp_medsam.preprocess import encoder_input, resize_aa
from mcp_medsam.prompts import box_to_grid, crop_box, tight_box
from mcp_medsam_torch.train.augment import AugmentConfig, make_sample
from mcp_medsam_torch.train.data import build_index
from mcp_medsam_torch.train.dataset import TrainSamples

from conftest import SAMPLE
pytestmark = pytest.mark.skipif(not (SAMPLE / "imgs").is_dir(), reason="sample data missing")


def _case(name: str = "2DBox_Mammo_DDSMtissue_A-0002-1-RIGHT-MLO.npz"):
    with np.load(SAMPLE / "imgs" / name) as a, np.load(SAMPLE / "gts" / name) as g:
        return a["imgs"], g["gts"]


def test_plain_sample_is_the_inference_preprocessing() -> None:
    img, gt = _case()
    cfg = AugmentConfig(flip_prob=0.0, box_jitter=0, clip_crops=True)
    s = make_sample(img, gt, 2, rng=np.random.default_rng(0), cfg=cfg)
    x, hw = encoder_input(img, 256)
    box = tight_box(gt == 2)
    assert s["image"].dtype == np.float32 and s["image"].shape == (3, 256, 256)
    np.testing.assert_array_equal(s["image"], x)
    np.testing.assert_array_equal(s["box"], box_to_grid(box, *gt.shape, 256))
    np.testing.assert_array_equal(s["crop"], resize_aa(crop_box(img, box), 64))
    np.testing.assert_array_equal(s["crop_clip"], resize_aa(crop_box(img, box), 224))
    assert s["mask"].shape == (1, 256, 256) and s["mask"].dtype == np.float32
    assert set(np.unique(s["mask"])) == {0.0, 1.0} and s["mask"][0, hw[0]:].sum() == 0
    assert tuple(s["new_hw"]) == hw and not s["flips"].any()


def test_flipped_sample_crops_the_flipped_image() -> None:
    img, gt = _case()
    cfg = AugmentConfig(flip_prob=1.0, box_jitter=0)
    s = make_sample(img, gt, 2, rng=np.random.default_rng(0), cfg=cfg)
    flipped, fgt = img[::-1, ::-1], gt[::-1, ::-1]
    assert s["flips"].all()
    np.testing.assert_array_equal(s["image"], encoder_input(np.ascontiguousarray(flipped), 256)[0])
    box = tight_box(fgt == 2)
    np.testing.assert_array_equal(s["crop_box"], box)
    # the content crop shows the region the (flipped) box refers to, not the mirrored one
    np.testing.assert_array_equal(s["crop"], resize_aa(crop_box(np.ascontiguousarray(flipped), box), 64))
    ys, xs = np.nonzero(s["mask"][0])
    x0, y0, x1, y1 = s["box"]
    assert x0 <= xs.min() + 1 and xs.max() <= x1 + 1 and y0 <= ys.min() + 1 and ys.max() <= y1 + 1


def test_box_jitter_moves_sides_outward_up_to_5px() -> None:
    img, gt = _case()
    base = box_to_grid(tight_box(gt == 2), *gt.shape, 256)
    moves = []
    for seed in range(60):
        s = make_sample(img, gt, 2, rng=np.random.default_rng(seed), cfg=AugmentConfig(flip_prob=0.0))
        d = np.array([base[0] - s["box"][0], base[1] - s["box"][1], s["box"][2] - base[2], s["box"][3] - base[3]])
        moves.append(d)
        assert (s["box"] >= 0).all() and (s["box"] <= 256).all()
    moves = np.array(moves)
    assert moves.min() >= 0 and moves.max() <= 5 and len(np.unique(moves)) == 6


def test_dataset_items_are_deterministic(tmp_path: Path) -> None:
    index = build_index([SAMPLE])
    ds = TrainSamples(index=index, tokens=index.tokens, sampler="modality",
                      augment=AugmentConfig(image_size=64, crop_size=16, clip_crop_size=32), seed=3)
    a, b, c = ds[17], ds[17], ds[18]
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
    assert a["clip_key"] == b["clip_key"] and a["clip_key"] != c["clip_key"]
    assert a["image"].shape == (3, 64, 64) and a["crop"].shape == (3, 16, 16)
    assert index.tokens[int(a["token"])] == index.cases[int(a["case"])].token
