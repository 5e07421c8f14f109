"""The CVPR 2025 challenge's click rule, the one copy: where the simulated user clicks next.

As ``CVPR25_iter_eval.py`` of JunMa11/CVPR-MedSegFMCompetition does per class and round:

- error = ``(pred == label) != (truth == label)`` over the whole image;
- its largest connected component (full connectivity: 26 neighbours in 3D, 8 in 2D; on a tie in
  size the component met first in C (raster) order);
- the Euclidean distance transform of that component, computed in its bounding box padded by
  25 % of the box (at least 1 voxel) with zeros, so the image border counts as the edge of the
  error (a component of more than 60 M voxels is max-pooled 2x2x2 first and the transform
  repeated back, as the challenge does); if every distance is 0 the component itself is used;
- the click is a voxel where that distance is largest; among ties the challenge draws one with
  ``np.random.seed(42); np.random.choice(n)`` in ``np.argwhere`` order (reproduced exactly);
- foreground where the truth is the label (under-segmentation), else background.

Clicks are array indices: ``(z, y, x)`` for volumes, ``(y, x)`` for 2D images. The challenge's
classes are the gt labels present, sorted; click list entry i belongs to the i-th of them.

Needs scipy (the ``eval`` extra), imported when a click is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

LARGE_ROI = 60_000_000  # voxels of the padded box above which the challenge halves the resolution


@dataclass(frozen=True)
class Click:
    """One simulated click: ``at`` array indices ((z, y, x) or (y, x)), ``foreground`` True for fg."""

    at: tuple[int, ...]
    foreground: bool

    @property
    def kind(self) -> str:
        return "fg" if self.foreground else "bg"


def _ndimage() -> Any:
    try:
        from scipy import ndimage
    except ImportError:
        raise InputError("the challenge's click rule needs scipy: pip install 'mcp-medsam[eval]'") from None
    return ndimage


def largest_component(error: np.ndarray) -> np.ndarray:
    """(…) bool error mask -> bool mask of its largest fully connected component (empty if none)."""
    ndimage = _ndimage()
    labels, n = ndimage.label(error, structure=ndimage.generate_binary_structure(error.ndim, error.ndim))
    if n == 0:
        return np.zeros(error.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def component_edt(component: np.ndarray) -> np.ndarray:
    """Distance (float64, shaped like ``component``) of each voxel of a non-empty bool component to
    the nearest voxel outside it, the image border counting as outside (the challenge's compute_edt)."""
    ndimage = _ndimage()
    coords = np.argwhere(component)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    shape = hi - lo
    pad = np.maximum((shape * 0.25).astype(int), 1)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    padded = np.zeros(shape + 2 * pad, np.uint8)
    padded[tuple(slice(p, p + s) for p, s in zip(pad, shape))] = component[box]
    large = padded.size > LARGE_ROI and padded.ndim == 3
    if large:  # skimage's block_reduce(block_size=2, func=np.max): zero-pad to even sizes, max per 2x2x2 block
        even = np.pad(padded, [(0, s % 2) for s in padded.shape])
        z, y, x = (s // 2 for s in even.shape)
        padded = even.reshape(z, 2, y, 2, x, 2).max(axis=(1, 3, 5))
    edt = ndimage.distance_transform_edt(padded)
    if large:
        edt = edt.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    out = np.zeros(component.shape, edt.dtype)
    out[box] = edt[tuple(slice(p, p + s) for p, s in zip(pad, shape))]
    return out


def next_click(pred: np.ndarray, truth: np.ndarray) -> Click | None:
    """The challenge's click for one class: pred, truth bool masks of one shape ((D, H, W) or (H, W));
    None when they agree everywhere."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise InputError(f"prediction shape {pred.shape} differs from the ground truth's {truth.shape}")
    error = pred != truth
    if not error.any():
        return None
    component = largest_component(error)
    edt = component_edt(component) * component
    if not edt.any():
        edt = component.astype(np.float64)
    ties = np.argwhere(edt == edt.max())
    at = tuple(int(v) for v in ties[np.random.RandomState(42).choice(len(ties))])
    return Click(at=at, foreground=bool(truth[at]))


def challenge_classes(truth: np.ndarray) -> list[int]:
    """The labels the challenge clicks for: those present in the ground truth, sorted, background left out."""
    return [int(v) for v in np.unique(truth) if v != 0]


def click_round(pred: np.ndarray, truth: np.ndarray, clicks: list[dict[str, list[list[int]]]],
                order: list[list[str | None]]) -> list[Click | None]:
    """One round of the challenge for every class: appends each class's new click to ``clicks[i]``
    (``{"fg": [...], "bg": [...]}``, index lists) and its kind (or None: no error) to ``order[i]``.

    pred, truth: label arrays ((D, H, W) or (H, W)); clicks, order: one entry per class of
    :func:`challenge_classes` (created when empty). Returns the new click per class."""
    classes = challenge_classes(truth)
    if not clicks:
        clicks.extend({"fg": [], "bg": []} for _ in classes)
        order.extend([] for _ in classes)
    if len(clicks) != len(classes) or len(order) != len(classes):
        raise InputError(f"{len(clicks)} click lists for {len(classes)} ground-truth classes")
    new = []
    for i, label in enumerate(classes):
        click = next_click(pred == label, truth == label)
        if click is None:
            order[i].append(None)
        else:
            clicks[i][click.kind].append(list(click.at))
            order[i].append(click.kind)
        new.append(click)
    return new
