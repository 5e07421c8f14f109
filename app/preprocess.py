"""Pre- and post-processing exactly as the official MCP-MedSAM / LiteMedSAM pipelines, without torch.

All functions are pure numpy/OpenCV. Shapes: images (H, W, 3) uint8, encoder input (3, S, S)
float32 with S = 256 (read from the manifest), crops (3, n, n) float32 in [0, 1].
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np


def resized_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side = target: ``int(side * target / max(h, w) + 0.5)``."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def encoder_input(img: np.ndarray, target: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) or grey (H, W) uint8 -> ((3, target, target) float32, (new_h, new_w)).

    INTER_AREA resize of the longest side, min-max normalisation over all channels of the resized
    image (float64, denominator clipped at 1e-8, as the official code), zero padding bottom/right.
    A grey image (a 3D slice) gives what its 3-channel repetition gives, at a third of the cost.
    """
    h, w = img.shape[:2]
    nh, nw = resized_shape(h, w, target)
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    lo, hi = float(small.min()), float(small.max())
    norm = ((small.astype(np.float64) - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    out = np.zeros((3, target, target), dtype=np.float32)
    out[:, :nh, :nw] = norm.transpose(2, 0, 1) if norm.ndim == 3 else norm
    return out, (nh, nw)


def box_to_grid(box: np.ndarray, h: int, w: int, target: int) -> np.ndarray:
    """Box coordinates (any length) to the target grid by truncation: ``int(c * target / max(h, w))``."""
    ratio = target / max(h, w)
    return np.trunc(np.asarray(box, dtype=np.float64) * ratio).astype(np.float32)


def mask_box_on_grid(mask: np.ndarray, bbox: np.ndarray, new_hw: tuple[int, int], target: int) -> np.ndarray:
    """Bounding box (x0, y0, x1, y1) float32 of a (H, W) bool mask as seen on the resized grid.

    As the official propagation: the mask is resized with INTER_AREA to the encoder's resized size
    and the box taken there, which places its edges where the mask's pixels land on the grid
    (truncating the original box instead is up to one source pixel off: several grid pixels for
    small images). The mask is resized as 0/1, not as its label value (the official code resizes
    the label image, which makes the box depend on the label number). If the mask vanishes in the
    resize, the truncated original box is used.
    """
    nh, nw = new_hw
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_AREA)
    ys, xs = np.nonzero(small)
    if not len(xs):
        h, w = mask.shape
        return box_to_grid(bbox, h, w, target)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def propagated_prompt(mask: np.ndarray, new_hw: tuple[int, int], target: int, margin: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The next slice's prompt from a non-empty (H, W) bool mask: (crop box in original pixels
    (4,) int, grid box (4,) float32), both the mask's bounding box widened by ``margin``."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    bb = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    pad = np.array([-margin, -margin, margin, margin])
    grid = np.clip(mask_box_on_grid(mask, bb, new_hw, target) + pad, 0, target)
    return np.clip(bb + pad, 0, [w, h, w, h]), grid


@lru_cache(maxsize=256)
def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of antialiased bilinear resampling (torch/PIL semantics).

    Equals ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` along one axis:
    a triangle filter widened by the scale factor when downsampling, plain bilinear when upsampling,
    weights renormalised at the borders.
    """
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        wts = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * inv))
        total = wts.sum()
        if total > 0:
            m[i, lo:hi] = wts / total
    return m


def resize_aa(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) or grey (h, w) uint8 -> (3, size, size) float32: /255, then antialiased bilinear
    resize (a grey crop is repeated to 3 channels, as the official code repeats a 3D slice)."""
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    x = img.astype(np.float32) / np.float32(255.0)
    wy = _aa_weights(x.shape[0], size).astype(np.float32)
    wx = _aa_weights(x.shape[1], size).astype(np.float32)
    # (size, h) @ (h, w*3) then along w; channels last keeps both products contiguous.
    t = (wy @ x.reshape(x.shape[0], -1)).reshape(size, x.shape[1], 3)
    out = np.einsum("ow,hwc->cho", wx, t, optimize=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def crop_box(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """``img[y0:y1, x0:x1]`` as the official code crops (max row/column excluded).

    Coordinates are clipped to the image first, and an empty crop keeps at least one row and
    column (the official inference raises on an empty crop; its training loader substitutes zeros).
    """
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box[:4])
    x0 = min(max(x0, 0), w - 1)
    y0 = min(max(y0, 0), h - 1)
    x1 = min(max(x1, x0 + 1), w)
    y1 = min(max(y1, y0 + 1), h)
    return img[y0:y1, x0:x1]


def postprocess_logits(logits: np.ndarray, new_hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """(S, S) float32 low-res logits -> (H, W) bool mask: crop to the resized size, bilinear
    (half-pixel centres, as F.interpolate align_corners=False) to the original size, > 0."""
    nh, nw = new_hw
    h, w = orig_hw
    up = cv2.resize(np.ascontiguousarray(logits[:nh, :nw]), (w, h), interpolation=cv2.INTER_LINEAR)
    return up > 0
