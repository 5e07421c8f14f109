"""How closely a faster precision's masks agree with FP32's (numpy only; no scipy).

Two measures, both Dice from :mod:`mcp_medsam.evaluation.dice`:

- per box (what the variants' bars are held to, :func:`box_masks` + :func:`box_agreement`): a 2D
  box's mask, from one decoder call per box on the image's embedding; a 3D box's mask on each slice
  of its z range, from the whole propagation chain run for that box alone (each slice's prompt
  comes from the previous slice's mask of the same precision, so differences carry along as they
  do in use). Both masks empty: 1.
- per label of written segmentations (``mcp-medsam bench``, :func:`label_agreement`): label l's
  region of two label maps (2D), or on each slice of box l's z range (3D). Boxes that overlap
  share pixels in label maps, so this differs from the per-box measure where boxes overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..modality import modality_token
from .dice import batch_dice


@dataclass
class BoxMasks:
    """Per-box masks of one case.

    masks: 2D: one (N, H, W) bool array; 3D: one (z1 - z0 + 1, H, W) bool array per box (its z range);
    boxes: the case's (N, 4) or (N, 6) boxes; labels: the case's label map composed from the masks
    (later boxes overwrite earlier ones, as ``predict`` writes it); seconds: time to compute them.
    """

    case: str
    is_3d: bool
    boxes: np.ndarray
    masks: list[np.ndarray]
    labels: np.ndarray
    seconds: float


def box_masks(segmenter, path: Path, *, default_modality: str | None = None) -> BoxMasks:
    """Per-box masks of an NPZ case through ``segmenter`` (a :class:`mcp_medsam.Segmenter`)."""
    from ..io.npz import load_case
    from ..prompts import label_dtype

    t0 = time.perf_counter()
    case = load_case(Path(path))
    token = modality_token(Path(path).name) or default_modality
    boxes = np.asarray(case.boxes)
    labels = np.zeros(case.shape, dtype=label_dtype(len(boxes)))
    if not case.is_3d:
        masks, _ = segmenter.decode(segmenter.embed(case.image), boxes, token)
        for label, m in enumerate(masks, start=1):
            np.maximum(labels, label, out=labels, where=m)
        out = [np.asarray(masks, bool).reshape((len(boxes),) + case.shape)]
    else:
        cache = segmenter.slice_cache(segmenter.cache_slices)  # each slice encoded once for all boxes
        out = []
        for label, b in enumerate(boxes, start=1):
            z0, z1 = int(b[2]), int(b[5])
            m = segmenter.segment_volume(case.image, b[None], token, cache=cache)[z0:z1 + 1] > 0
            np.maximum(labels[z0:z1 + 1], label, out=labels[z0:z1 + 1], where=m)
            out.append(m)
    return BoxMasks(Path(path).name, case.is_3d, boxes, out, labels, time.perf_counter() - t0)


def box_agreement(ref: BoxMasks, got: BoxMasks) -> np.ndarray:
    """Dice per 2D box (N,) or per 3D box-slice (sum of the boxes' slice counts,) of ``got`` against ``ref``."""
    if ref.is_3d != got.is_3d or len(ref.masks) != len(got.masks):
        raise ValueError(f"{ref.case} and {got.case} are not the same case")
    return np.concatenate([batch_dice(a, b) for a, b in zip(ref.masks, got.masks)])


def label_agreement(ref: np.ndarray, got: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Dice per label 1..N (2D) or per (label, slice of its box's z range) (3D) of two label maps."""
    ref, got = np.asarray(ref), np.asarray(got)
    boxes = np.asarray(boxes)
    out = []
    for label, b in enumerate(boxes, start=1):
        if boxes.shape[1] == 6:
            z0, z1 = int(b[2]), int(b[5])
            out.append(batch_dice(ref[z0:z1 + 1] == label, got[z0:z1 + 1] == label))
        else:
            out.append(batch_dice((ref == label)[None], (got == label)[None]))
    return np.concatenate(out) if out else np.zeros(0)
