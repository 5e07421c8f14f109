"""Pre- and post-processing exactly as the official MCP-MedSAM / LiteMedSAM pipelines, without torch.

All functions are pure numpy/OpenCV. Shapes: images (H, W, 3) uint8, encoder input (3, S, S)
float32 with S = 256 (read from the manifest), crops (3, n, n) float32 in [0, 1]. Box geometry
lives in :mod:`.prompts`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from .errors import InputError


def check_image(a: np.ndarray, *, volume: bool, name: str = "image") -> np.ndarray:
    """A user's image as the model takes it: (H, W, 3) uint8 for 2D (grey (H, W) or (H, W, 1) is
    repeated to 3 channels), (D, H, W) uint8 for a volume. Numbers in 0..255 of another dtype are
    converted (floats rounded; floats in 0..1 with fractions are refused as a 0..1 scaling); anything
    else raises InputError saying what is wrong (``name``: how the message calls the array, e.g.
    ``imgs`` for an NPZ member)."""
    a = np.asarray(a)
    if volume:
        if a.ndim != 3:
            raise InputError(f"{name} has shape {a.shape}; a volume needs (D, H, W)")
    else:
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3:
            raise InputError(f"{name} has shape {a.shape}; a 2D image needs (H, W, 3) or (H, W)")
    if min(a.shape) == 0:
        raise InputError(f"{name} is empty (shape {a.shape})")
    if a.dtype != np.uint8:
        if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise InputError(f"{name} has dtype {a.dtype}; expected uint8 (or numbers in 0..255)")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise InputError(f"{name} contains NaN or infinite values")
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > 255:
            raise InputError(f"{name} values span {lo}..{hi}; expected 0..255")
        if np.issubdtype(a.dtype, np.floating) and hi <= 1 and not np.array_equal(a, np.rint(a)):
            # rounding 0..1 to 0/1 would segment a black image without a word
            raise InputError(f"{name} is {a.dtype} with values in {lo:g}..{hi:g}, scaled to 0..1 it seems; the model "
                             f"takes 0..255 (uint8): pass (image * 255).round().astype(np.uint8)")
        a = np.rint(a).astype(np.uint8) if np.issubdtype(a.dtype, np.floating) else a.astype(np.uint8)
    return np.ascontiguousarray(a)


def resized_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side = target: ``int(side * target / max(h, w) + 0.5)``.

    Raises InputError for an image so elongated that its short side would resize to 0 pixels."""
    scale = target * 1.0 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    if min(nh, nw) < 1:
        raise InputError(f"an image of {h}x{w} pixels would be resized to {nh}x{nw} on the model's {target}-pixel "
                         f"grid; its short side needs at least {math.ceil(max(h, w) / (2 * target))} pixels")
    return nh, nw


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


def postprocess_logits(logits: np.ndarray, new_hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """(S, S) float32 low-res logits -> (H, W) bool mask: crop to the resized size, bilinear
    (half-pixel centres, as F.interpolate align_corners=False) to the original size, > 0."""
    nh, nw = new_hw
    h, w = orig_hw
    up = cv2.resize(np.ascontiguousarray(logits[:nh, :nw]), (w, h), interpolation=cv2.INTER_LINEAR)
    return up > 0
