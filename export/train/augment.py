"""One training sample from one (slice, label): preprocessing, flips, box jitter, crops.

Preprocessing and prompts are the appliance's own (:mod:`mcp_medsam.preprocess`, :mod:`mcp_medsam.prompts`), so the
model trains on exactly what it sees at inference: longest side to S with INTER_AREA, min-max to
[0, 1], zero padding bottom/right; the box truncated to the S grid; the content crops taken from
the uint8 image at original resolution, /255, antialiased bilinear to E and to the CLIP size.

Where this deliberately differs from the official loader (``modality_npz_dataset.py``):

- The crops come from the same augmented (flipped) image the box refers to. The official loader
  flips the encoder input and the mask but crops the *unflipped* original with a box computed
  before the flip, so on a flipped sample the content prompt shows the mirrored region: a bug,
  not copied.
- Flips are applied to the original image (and mask) before resizing and padding, so the padding
  stays at the bottom/right as at inference; the official loader flips the padded S x S image,
  which moves the padding to the top/left.
- The box is the original-resolution tight box of the label mapped with
  :func:`mcp_medsam.prompts.box_to_grid` (as inference maps the challenge boxes), then each side moved
  outward by ``randint(0, jitter)`` on the S grid and clipped to [0, S] (the official jitter).
  The crop box is that same jittered box in original pixels; the official loader jitters its crop
  box independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mcp_medsam.preprocess import encoder_input, resize_aa
from mcp_medsam.prompts import box_to_grid, crop_box, jitter_box, tight_box


@dataclass(frozen=True)
class AugmentConfig:
    image_size: int = 256  # S: encoder input side; boxes live on this grid
    crop_size: int = 64  # E: crop CNN input side
    clip_crop_size: int = 224  # CLIP image size
    flip_prob: float = 0.5  # probability of each of the horizontal and vertical flips
    box_jitter: int = 5  # max outward move of each box side, in S-grid pixels
    clip_crops: bool = False  # also produce the CLIP-size crop (only when a CLIP tower is used)


def mask_to_grid(mask: np.ndarray, new_hw: tuple[int, int], size: int) -> np.ndarray:
    """(H, W) bool/uint8 -> (size, size) uint8 0/1: nearest resize to (new_h, new_w), zero pad."""
    nh, nw = new_hw
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
    out = np.zeros((size, size), dtype=np.uint8)
    out[:nh, :nw] = small
    return out


def make_sample(img: np.ndarray, gt: np.ndarray, label: int, *, rng: np.random.Generator,
                cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 image, (H, W) integer label map, a label present in it -> one sample.

    Returns numpy arrays:
      image (3, S, S) float32 in [0, 1]; mask (1, S, S) float32 0/1; box (4,) float32 on the S grid;
      crop (3, E, E) float32 in [0, 1]; crop_clip (3, C, C) float32 (only with ``cfg.clip_crops``);
      crop_box (4,) int64 original pixels; flips (2,) bool [horizontal, vertical]; new_hw (2,) int64.
    Draw order from ``rng`` (fixed, so a sample is reproducible): horizontal flip, vertical flip,
    four side shifts.
    """
    flip_h = bool(rng.random() < cfg.flip_prob)
    flip_v = bool(rng.random() < cfg.flip_prob)
    shifts = rng.integers(0, cfg.box_jitter + 1, size=4) if cfg.box_jitter > 0 else np.zeros(4, dtype=np.int64)
    mask = gt == label
    if flip_h:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if flip_v:
        img, mask = img[::-1], mask[::-1]
    img = np.ascontiguousarray(img)
    h, w = mask.shape
    image, new_hw = encoder_input(img, cfg.image_size)
    orig_box = tight_box(mask)
    grid, cbox = jitter_box(box_to_grid(orig_box, h, w, cfg.image_size), orig_box, shifts, hw=(h, w),
                            size=cfg.image_size)
    # Inference crops img[y0:y1, x0:x1] of the (inclusive) box, max row/column excluded: same here.
    patch = crop_box(img, cbox)
    out = {
        "image": image,
        "mask": mask_to_grid(mask, new_hw, cfg.image_size)[None].astype(np.float32),
        "box": grid,
        "crop": resize_aa(patch, cfg.crop_size),
        "crop_box": cbox,
        "flips": np.array([flip_h, flip_v]),
        "new_hw": np.asarray(new_hw, dtype=np.int64),
    }
    if cfg.clip_crops:
        out["crop_clip"] = resize_aa(patch, cfg.clip_crop_size)
    return out
