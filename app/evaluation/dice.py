"""Mask Dice, the one copy: ``2 |A and B| / (|A| + |B|)``, 1.0 when both masks are empty.

numpy only (no scipy), so that the torch-free runtime, the challenge metrics, export verification,
INT8 accuracy control, training validation and distillation all score masks with this code.
"""

from __future__ import annotations

import numpy as np


def batch_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice of each pair of masks along the first axis: (B, ...) and (B, ...) bool -> (B,) float64.

    Any non-bool input is read as ``!= 0``. A pair of empty masks scores 1.0 (nothing to find,
    nothing wrongly found). Raises ValueError when the shapes differ.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} and {b.shape}")
    if a.ndim == 0:
        raise ValueError("batch_dice needs masks with a leading batch axis")
    axes = tuple(range(1, a.ndim))
    inter = np.count_nonzero(a & b, axis=axes)
    total = np.count_nonzero(a, axis=axes) + np.count_nonzero(b, axis=axes)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def dice(gt: np.ndarray, seg: np.ndarray) -> float:
    """Dice of two masks of the same shape (any ndim); both empty -> 1.0."""
    gt = np.asarray(gt, dtype=bool)
    seg = np.asarray(seg, dtype=bool)
    if gt.shape != seg.shape:
        raise ValueError(f"shape mismatch: gt {gt.shape}, seg {seg.shape}")
    return float(batch_dice(gt[None], seg[None])[0])
