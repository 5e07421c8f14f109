"""Quick-look PNGs: the image (the middle slice of the boxes for 3D) with boxes and masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .io.atomic import atomic_file
from .io.npz import Case


def label_colour(label: int) -> tuple[int, int, int]:
    """The BGR colour of a label in overlays (and the service's colour label PNGs)."""
    # Golden-angle hues: neighbouring labels get clearly different colours.
    hue = int((label * 137.508) % 180)
    bgr = cv2.cvtColor(np.array([[[hue, 200, 255]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def render(case: Case, segs: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 BGR picture of the masks (alpha-blended) and boxes of one case."""
    boxes = case.boxes
    if case.is_3d:
        z = int((boxes[:, 2].min() + boxes[:, 5].max()) // 2) if len(boxes) else case.image.shape[0] // 2
        img = np.repeat(case.image[z][:, :, None], 3, axis=2)
        seg = segs[z]
        keep = [(i, b) for i, b in enumerate(boxes, start=1) if b[2] <= z <= b[5]]
        rects = [(i, b[[0, 1, 3, 4]]) for i, b in keep]
    else:
        img = case.image[:, :, ::-1]
        seg = segs
        rects = list(enumerate(boxes, start=1))
    out = img.astype(np.float32)
    for label in np.unique(seg):
        if label == 0:
            continue
        m = seg == label
        out[m] = (1 - alpha) * out[m] + alpha * np.array(label_colour(int(label)), np.float32)
    out = out.astype(np.uint8)
    thick = max(1, round(max(img.shape[:2]) / 400))
    for label, b in rects:
        cv2.rectangle(out, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), label_colour(int(label)), thick)
    return out


def write_overlay(path: Path, case: Case, segs: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", render(case, segs))
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    with atomic_file(path, "wb") as f:
        f.write(png.tobytes())
