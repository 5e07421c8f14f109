"""The CVPR 2024 "MedSAM on Laptop" challenge metrics: DSC and normalised surface Dice (NSD).

Torch-free (numpy + scipy). The NSD follows the challenge's surface-distance code (DeepMind's
``surface_distance`` as copied into ``evaluation/SurfaceDice.py`` of the LiteMedSAM branch of
bowang-lab/MedSAM, driven by ``evaluation/compute_metrics.py``):

- A surface element ("surfel") sits at every corner of the voxel grid whose 2x2x2 neighbourhood is
  neither all outside nor all inside. Its neighbourhood code (8 bits, corner ``(a, b, c)`` of the
  2x2x2 cell has weight ``1 << (7 - 4a - 2b - c)``) selects an area from a 256-entry table: the
  area in mm^2 of the marching-cubes triangles that code puts into the cell.
- The distance of a surfel to the other surface is the Euclidean distance (mm, anisotropic
  spacing) from its grid corner to the nearest surfel corner of the other mask
  (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``).
- NSD = (area of gt surfels within ``tolerance`` of the seg surface + area of seg surfels within
  ``tolerance`` of the gt surface) / (gt surfel area + seg surfel area).

2D cases are scored as the challenge does: the (H, W) mask becomes an (H, W, 1) volume with spacing
(1, 1, 1), so the flat top and bottom faces of that one-voxel slab count as surface too (a 2D NSD
is therefore not a contour-only NSD).

Case scores (:func:`case_scores`) average labels ``1..max(gt)``; the NSD of a case counts as 0 when
its DSC is <= 0.2 (challenge rule, switchable).

Edge cases the challenge script does not survive under NumPy >= 2 (it reaches ``np.Inf`` /
``np.NaN``), defined here:

- both masks empty: DSC 1 and NSD 1 from :func:`dice` / :func:`nsd` (nothing to find, nothing
  wrongly found); :func:`case_scores` skips such a label (a gap in the gt labels that the
  prediction also leaves empty) instead of averaging it in. The challenge script's DSC is NaN
  there, and so is its case mean.
- one mask empty, the other not: DSC 0, NSD 0 (the challenge script's value under NumPy 1).
- a gt with no label at all: the case scores 1 / 1 when the prediction has no foreground either,
  else 0 / 0 (the challenge script averages an empty list: NaN).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

from .dice import dice

__all__ = ["NSD_DSC_GATE", "LabelScore", "case_scores", "dice", "nsd", "surfel_area_table"]

# The challenge skips NSD for cases whose mean DSC is not above this (compute_metrics.py).
NSD_DSC_GATE = 0.2

# Cell corners (a, b, c) in code-bit order: corner k has weight 1 << (7 - k), the challenge's
# correlation kernel [[[128, 64], [32, 16]], [[8, 4], [2, 1]]].
_CORNERS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((0, 1), repeat=3))
_CUBE_EDGES: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i, j in itertools.combinations(range(8), 2)
    if sum(p != q for p, q in zip(_CORNERS[i], _CORNERS[j])) == 1
)
_CUBE_FACES: tuple[tuple[int, ...], ...] = tuple(
    tuple(k for k, corner in enumerate(_CORNERS) if corner[axis] == side)
    for axis in range(3) for side in (0, 1)
)


def _corner_set(code: int) -> frozenset[int]:
    return frozenset(k for k in range(8) if code & (1 << (7 - k)))


def _cell_polygons(code: int) -> list[list[tuple[int, int]]]:
    """Marching-cubes polygons of one cell: closed loops of cube edges (vertex = edge midpoint)."""
    inside = _corner_set(code)
    # A face with two diagonal corners inside is ambiguous. The challenge's table cuts off the
    # smaller of the two corner sets there (the inside set on a 4/4 tie); the complement gives the
    # same crossing edges, so working with the smaller set covers codes and their complements alike.
    minority = inside if len(inside) <= 4 else frozenset(range(8)) - inside
    segments = []
    for face in _CUBE_FACES:
        crossing = [e for e in _CUBE_EDGES
                    if e[0] in face and e[1] in face and (e[0] in minority) != (e[1] in minority)]
        if len(crossing) == 2:
            segments.append(tuple(crossing))
        elif len(crossing) == 4:
            segments += [tuple(e for e in crossing if k in e) for k in face if k in minority]
    neighbours: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for p, q in segments:
        neighbours.setdefault(p, []).append(q)
        neighbours.setdefault(q, []).append(p)
    loops, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        loop, prev = [start], None
        seen.add(start)
        while True:
            nxt = [v for v in neighbours[loop[-1]] if v != prev and v not in seen]
            if not nxt:
                break
            prev = loop[-1]
            loop.append(nxt[0])
            seen.add(nxt[0])
        loops.append(loop)
    return loops


@lru_cache(maxsize=None)
def _polygon_triangulations(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Every triangulation of an n-gon whose vertices are 0..n-1 in loop order."""
    def split(lo: int, hi: int) -> list[list[tuple[int, int, int]]]:
        if hi - lo < 2:
            return [[]]
        return [left + right + [(lo, k, hi)]
                for k in range(lo + 1, hi) for left in split(lo, k) for right in split(k, hi)]
    return tuple(tuple(t) for t in split(0, n - 1))


def _triangle_areas(tris: np.ndarray) -> np.ndarray:
    """(T, 3, 3) triangle vertices -> (T,) areas."""
    return 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=-1)


@lru_cache(maxsize=None)
def _cell_triangles() -> tuple[np.ndarray, ...]:
    """Per code, the (T, 3, 3) marching-cubes triangles of the cell, in voxel units.

    Loops with more than three vertices (edge midpoints) are not always planar (the L of three
    corners on a face gives a bent pentagon, some four-corner codes a bent hexagon), so their area
    depends on the triangulation. The challenge's table uses, for every code, the triangulation of
    largest total area in voxel units (ties broken by the largest sum of squared triangle areas);
    it is chosen once here, before any spacing is applied, as that table was. The result matches
    that table's area for every code and any spacing.
    """
    mid = np.array(_CORNERS, dtype=np.float64)
    out = []
    for code in range(256):
        tris = []
        for loop in _cell_polygons(code):
            pts = np.array([(mid[i] + mid[j]) / 2 for i, j in loop])
            best, best_key = None, None
            for tri_idx in _polygon_triangulations(len(loop)):
                cand = pts[np.array(tri_idx)]
                areas = _triangle_areas(cand)
                # Rounded so that float noise cannot break exact geometric ties.
                key = (round(float(areas.sum()), 9), round(float((areas ** 2).sum()), 9))
                if best_key is None or key > best_key:
                    best, best_key = cand, key
            tris.append(best)
        out.append(np.concatenate(tris) if tris else np.zeros((0, 3, 3)))
    return tuple(out)


@lru_cache(maxsize=64)
def surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """(256,) float64: surface area in mm^2 that each 2x2x2 neighbourhood code contributes.

    ``spacing`` is the voxel size (mm) along the three array axes. Codes 0 and 255 have no surface.
    """
    scale = np.asarray(spacing, dtype=np.float64)
    table = np.zeros(256, dtype=np.float64)
    for code, tris in enumerate(_cell_triangles()):
        if len(tris):
            table[code] = _triangle_areas(tris * scale).sum()
    table.setflags(write=False)
    return table


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """(n0, n1, n2) bool -> (n0+1, n1+1, n2+1) uint8 codes of every 2x2x2 cell, zero outside."""
    padded = np.pad(mask, 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for k, (a, b, c) in enumerate(_CORNERS):
        np.bitwise_or(codes, np.uint8(1 << (7 - k)), out=codes, where=padded[a:a + n0, b:b + n1, c:c + n2])
    return codes


def _as_volume(gt: np.ndarray, seg: np.ndarray, spacing: Sequence[float] | None
               ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Bring 2D inputs to the challenge's (H, W, 1) volume; check shapes and spacing."""
    if gt.shape != seg.shape:
        raise ValueError(f"shape mismatch: gt {gt.shape}, seg {seg.shape}")
    if gt.ndim == 2:
        sp = (1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
        if len(sp) != 2:
            raise ValueError(f"2D masks need no spacing or 2 values, got {spacing}")
        return gt[..., None], seg[..., None], (sp[0], sp[1], 1.0)
    if gt.ndim == 3:
        sp = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
        if len(sp) != 3:
            raise ValueError(f"3D masks need 3 spacing values (z, y, x), got {spacing}")
        return gt, seg, (sp[0], sp[1], sp[2])
    raise ValueError(f"masks must be 2D or 3D, got shape {gt.shape}")


def _distances(surface: np.ndarray, at: tuple[np.ndarray, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) from the grid points ``at`` (np.nonzero form) to the nearest ``True`` of ``surface``.

    The values of ``distance_transform_edt(~surface, sampling=spacing)[at]``, with the same
    arithmetic (so ties at the tolerance fall the same way), but evaluated at the query points
    only instead of over the whole crop.
    """
    nearest = ndimage.distance_transform_edt(~surface, sampling=spacing, return_distances=False,
                                             return_indices=True)
    offsets = (nearest[(slice(None),) + at] - np.stack(at)).astype(np.float64)
    offsets *= np.asarray(spacing, dtype=np.float64)[:, None]
    np.multiply(offsets, offsets, out=offsets)
    return np.sqrt(np.add.reduce(offsets, axis=0))


def _nsd_cropped(gt: np.ndarray, seg: np.ndarray, spacing: tuple[float, float, float], tolerance: float) -> float:
    """NSD of two 3D bool masks that hold every voxel of both objects (crops are fine: the
    cells on the one-voxel zero border around them are added here)."""
    gt_codes = _neighbour_codes(gt)
    seg_codes = _neighbour_codes(seg)
    gt_surf = (gt_codes != 0) & (gt_codes != 255)
    seg_surf = (seg_codes != 0) & (seg_codes != 255)
    has_gt, has_seg = bool(gt_surf.any()), bool(seg_surf.any())
    if not (has_gt or has_seg):
        return 1.0
    if not (has_gt and has_seg):
        return 0.0
    table = surfel_area_table(spacing)
    gt_at, seg_at = np.nonzero(gt_surf), np.nonzero(seg_surf)
    gt_area = table[gt_codes[gt_at]]
    seg_area = table[seg_codes[seg_at]]
    within = (gt_area[_distances(seg_surf, gt_at, spacing) <= tolerance].sum()
              + seg_area[_distances(gt_surf, seg_at, spacing) <= tolerance].sum())
    return float(within / (gt_area.sum() + seg_area.sum()))


def _union_box(*boxes: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    return tuple(slice(min(b[d].start for b in present), max(b[d].stop for b in present))
                 for d in range(len(present[0])))


def nsd(gt: np.ndarray, seg: np.ndarray, spacing: Sequence[float] | None = None, tolerance: float = 2.0) -> float:
    """Normalised surface Dice of two bool masks at ``tolerance`` mm.

    3D masks (Z, Y, X) take ``spacing`` (z, y, x) in mm (default 1 mm). 2D masks (H, W) are scored
    as the challenge does, as an (H, W, 1) volume of spacing (1, 1, 1); a 2-value ``spacing``
    replaces the in-plane (1, 1). Both empty -> 1.0, one empty -> 0.0.
    """
    gt3, seg3, sp = _as_volume(np.asarray(gt, dtype=bool), np.asarray(seg, dtype=bool), spacing)
    box = _union_box(*ndimage.find_objects((gt3 | seg3).view(np.uint8)))
    if box is None:
        return 1.0
    return _nsd_cropped(gt3[box], seg3[box], sp, tolerance)


@dataclass(frozen=True)
class LabelScore:
    """Scores (0..1) of one label of a case."""
    label: int
    dsc: float
    nsd: float | None  # None: not computed (the case failed the DSC gate)


def _integer_labels(arr: np.ndarray) -> np.ndarray:
    # find_objects needs integer labels; bool and float predictions are accepted as label maps.
    if arr.dtype == bool:
        return arr.view(np.uint8)
    return arr if arr.dtype.kind in "iu" else arr.astype(np.int64)


def case_scores(gt_labels: np.ndarray, seg_labels: np.ndarray, spacing: Sequence[float] | None = None,
                tolerance: float = 2.0, nsd_dsc_gate: bool = True) -> tuple[float, float, list[LabelScore]]:
    """(dsc, nsd, per-label scores) of one case, as the challenge's compute_metrics.py.

    ``gt_labels``/``seg_labels``: integer label maps of one shape, 2D (H, W) or 3D (Z, Y, X); labels
    ``1..max(gt)`` are scored and averaged (prediction labels above max(gt) are ignored, like the
    challenge). ``spacing``: (z, y, x) mm for 3D; 2D maps follow :func:`nsd`.
    With ``nsd_dsc_gate`` the NSD is only computed when the case DSC is > 0.2 and is 0 otherwise.
    Labels absent from both maps are skipped (see the module docstring for the empty cases).
    Raises ValueError when the shapes differ.
    """
    gt3, seg3, sp = _as_volume(_integer_labels(np.asarray(gt_labels)), _integer_labels(np.asarray(seg_labels)),
                               spacing)
    n_labels = int(gt3.max()) if gt3.size else 0
    if n_labels < 1:
        empty = not np.any(seg3 > 0)
        return float(empty), float(empty), []
    # One pass over each volume for every label's bounding box, instead of one scan per label.
    gt_boxes = ndimage.find_objects(gt3, max_label=n_labels)
    seg_boxes = ndimage.find_objects(seg3, max_label=n_labels)
    boxes: list[tuple[int, tuple[slice, ...]]] = []
    dscs: list[float] = []
    for label in range(1, n_labels + 1):
        box = _union_box(gt_boxes[label - 1], seg_boxes[label - 1])
        if box is None:
            continue
        boxes.append((label, box))
        dscs.append(dice(gt3[box] == label, seg3[box] == label))
    case_dsc = float(np.mean(dscs))
    if nsd_dsc_gate and case_dsc <= NSD_DSC_GATE:
        return case_dsc, 0.0, [LabelScore(label, d, None) for (label, _), d in zip(boxes, dscs)]
    nsds = [_nsd_cropped(gt3[box] == label, seg3[box] == label, sp, tolerance) for label, box in boxes]
    per_label = [LabelScore(label, d, n) for (label, _), d, n in zip(boxes, dscs, nsds)]
    return case_dsc, float(np.mean(nsds)), per_label
