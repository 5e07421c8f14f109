"""Real cases for checking an export: which cases of a folder, which slices and boxes of a case.

Export verification and INT8 calibration/validation both draw their inputs here, so that both see
the cases as the runtime does (``mcp_medsam.io.npz.load_case``) and spread over modalities the
same way. Without a folder, one synthetic image stands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mcp_medsam.modality import modality_token


@dataclass(frozen=True)
class SliceBoxes:
    """Boxes on one 2D image or one slice of a case.

    tag: the case file name (``name[z=Z]`` for a slice); image: (H, W, 3) uint8; boxes: (K, 4)
    int64 ``x0, y0, x1, y1`` in original pixels (max inclusive); token: the case's modality token.
    """

    tag: str
    image: np.ndarray
    boxes: np.ndarray
    token: str


def spread_cases(folder: Path | None, n: int, *, alternate_dims: bool = False) -> list[Path]:
    """Up to n ``*.npz`` files of folder (all with n < 0), round-robin over the (2D/3D, modality)
    groups of their names, so that every group is represented before any repeats.

    Groups are taken in name order (every 2D group before the 3D ones); ``alternate_dims``
    alternates 2D and 3D groups instead, so that a few picks already hold both kinds of case.
    """
    if folder is None:
        return []
    files = sorted(p for p in Path(folder).glob("*.npz") if p.is_file())
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f"{f.name.split('_')[0]}_{modality_token(f.name)}", []).append(f)
    queues = [list(g) for g in groups.values()]
    if alternate_dims:
        flat = [q for q in queues if not q[0].name.startswith("3DBox_")]
        deep = [q for q in queues if q[0].name.startswith("3DBox_")]
        queues = [q for pair in zip_longest(flat, deep) for q in pair if q is not None]
    order: list[Path] = []
    while queues:
        for q in queues:
            order.append(q.pop(0))
        queues = [q for q in queues if q]
    return order[:n] if n >= 0 else order


def synthetic_image(rng: np.random.Generator, h: int = 300, w: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A grey (H, W, 3) uint8 image with three bright blobs and their (3, 4) boxes, when no real case is given."""
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(60, 10, (h, w))
    boxes = []
    for cy, cx, r in ((80, 100, 40), (180, 260, 60), (230, 90, 30)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 120
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2), np.array(boxes)


def case_slices(path: Path | None, rng: np.random.Generator, *, fractions: Iterable[float],
                max_boxes: int) -> list[SliceBoxes]:
    """The 2D image of a case, or slices of a 3D case, with their boxes.

    2D: the image with up to ``max_boxes`` of its boxes (a random choice when there are more).
    3D: for each of the first ``max_boxes`` boxes, the slices at ``fractions`` of its z range
    (0.5: the middle slice, where inference starts), the 2D box on each; boxes that land on the
    same slice share it. ``path`` None: :func:`synthetic_image` (as CT).
    """
    from mcp_medsam.io.npz import load_case

    if path is None:
        img, boxes = synthetic_image(rng)
        return [SliceBoxes("synthetic", img, boxes[:max_boxes].astype(np.int64), "CT")]
    case = load_case(path)
    token = modality_token(path.name)
    if not case.is_3d:
        boxes = case.boxes
        if len(boxes) > max_boxes:
            boxes = boxes[np.sort(rng.choice(len(boxes), max_boxes, replace=False))]
        return [SliceBoxes(path.name, case.image, np.asarray(boxes, np.int64), token)]
    per_z: dict[int, list[np.ndarray]] = {}
    for b in case.boxes[:max_boxes]:
        x0, y0, z0, x1, y1, z1 = (int(v) for v in b)
        for f in fractions:
            per_z.setdefault(int(round(z0 + f * (z1 - z0))), []).append(np.array([x0, y0, x1, y1]))
    return [SliceBoxes(f"{path.name}[z={z}]", np.repeat(case.image[z][:, :, None], 3, axis=2),
                       np.stack(bs).astype(np.int64), token) for z, bs in sorted(per_z.items())]


def table_row(tokens: Sequence[str], token: str) -> int:
    """Row of a modality token in the model's modality table (row 0 for a token the table lacks)."""
    return list(tokens).index(token) if token in tokens else 0
