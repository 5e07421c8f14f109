"""Box prompts, the one copy: validation, the 256 grid, content crops, propagation, jitter, decoder feed.

Used by the segmenter, the export's verification, INT8 calibration, training and distillation, so
that every one of them gives the model exactly the prompts inference gives it.

Conventions (the CVPR24 NPZ boxes and the official MCP-MedSAM pipeline):
- A box is ``(x0, y0, x1, y1)`` (2D) or ``(x0, y0, z0, x1, y1, z1)`` (3D) in pixel indices of the
  original image, x = column, y = row, z = slice, max inclusive.
- On the encoder grid (S = 256) each coordinate is truncated: ``int(c * S / max(H, W))``.
- The content crop is ``img[y0:y1, x0:x1]`` of the original uint8 image: the max row and column of
  the inclusive box are left out, as the official code slices. Crop boxes are clipped to
  ``[0, W] x [0, H]`` (the official propagation clips its crop box there) and keep at least one
  row and column (the official inference raises on an empty crop).
- The propagated prompt for the next slice is the previous mask's bounding box, widened by a
  margin (3): on the grid as the mask lands there after an INTER_AREA resize (clipped to
  ``[0, S]``), and in original pixels for the crop.
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import InputError
from .preprocess import resize_aa

MAX_LABELS = int(np.iinfo(np.uint16).max)
# The official propagation widens the previous mask's box by 3 px (grid and crop). The exporter writes it
# into manifest.json (preprocessing.propagation_margin), which inference and INT8 calibration read.
PROPAGATION_MARGIN = 3


def check_boxes(raw: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """Validate and clip boxes given by a user or a file.

    raw: (N, 2k) or (2k,) numbers, k = len(dims); dims: the image size in box-coordinate order,
    (W, H) for 2D, (W, H, D) for 3D. Returns (N, 2k) int64 clipped to the image. Raises InputError
    for NaN, inverted, zero-width/height or wholly-outside boxes, naming the box.
    """
    raw = np.asarray(raw)
    width = 2 * len(dims)
    if raw.dtype == np.bool_ or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise InputError(f"boxes has dtype {raw.dtype}; expected numbers")
    if raw.ndim == 1 and raw.size == width:
        raw = raw[None]
    if raw.size == 0:
        return np.zeros((0, width), np.int64)
    if raw.ndim != 2 or raw.shape[1] != width:
        raise InputError(f"boxes has shape {raw.shape}; a {'3D' if width == 6 else '2D'} image needs (N, {width})")
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raise InputError("boxes contain NaN or infinite values")
    if len(raw) > MAX_LABELS:
        raise InputError(f"{len(raw)} boxes; at most {MAX_LABELS} labels fit in uint16 segs")
    # Checked and clipped as float64, converted to integers last: coordinates at or beyond 2**63
    # (int64/uint64 extremes, 1e19, 1e300) would otherwise wrap and read as empty or inverted boxes.
    boxes = np.rint(raw.astype(np.float64))
    k = width // 2
    lo, hi = boxes[:, :k], boxes[:, k:]
    limit = np.array(dims, dtype=np.float64)
    axes = "xyz"
    for i, b in enumerate(boxes):
        shown = [int(v) if abs(v) < 2 ** 63 else float(v) for v in b]
        for a in range(k):
            if hi[i, a] < lo[i, a]:
                what = "z_min > z_max" if a == 2 else f"{axes[a]}_max < {axes[a]}_min"
                raise InputError(f"box {i + 1} {shown} is inverted ({what})")
            if a < 2 and hi[i, a] == lo[i, a]:
                raise InputError(f"box {i + 1} {shown} is empty (zero {'width' if a == 0 else 'height'})")
        if (hi[i] < 0).any() or (lo[i] >= limit).any():
            size = "x".join(map(str, dims))
            raise InputError(f"box {i + 1} {shown} lies wholly outside the image (size {size})")
    # Boxes partly outside are clipped to the image.
    return np.concatenate([np.clip(lo, 0, limit - 1), np.clip(hi, 0, limit - 1)], axis=1).astype(np.int64)


def label_dtype(n_boxes: int) -> type:
    """uint8 labels up to 255 boxes, else uint16 (the official scripts wrap or crash above 255)."""
    return np.uint8 if n_boxes <= 255 else np.uint16


def covered_slices(boxes: np.ndarray) -> int:
    """Distinct slices a set of (N, 6) 3D boxes segments (each covers z0..z1 inclusive)."""
    zs: set[int] = set()
    for b in np.asarray(boxes).reshape(-1, 6):
        zs.update(range(int(b[2]), int(b[5]) + 1))
    return len(zs)


def box_to_grid(box: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """Box coordinates (any length) to the size-S grid by truncation: ``int(c * S / max(H, W))``; float32."""
    ratio = size / max(h, w)
    return np.trunc(np.asarray(box, dtype=np.float64) * ratio).astype(np.float32)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (4,) int64 ``[x0, y0, x1, y1]``, max inclusive (the CVPR24 box convention)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("an empty mask has no box")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


def clip_crop_box(box: np.ndarray, h: int, w: int) -> np.ndarray:
    """(4,) crop box clipped to ``[0, W] x [0, H]``, int64 (the slice ends are exclusive)."""
    return np.clip(np.asarray(box[:4], dtype=np.int64), 0, [w, h, w, h])


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


def content_crops(img: np.ndarray, crop_boxes: np.ndarray, size: int) -> np.ndarray:
    """(B, 3, size, size) float32 content crops of an (H, W, 3) image or a grey (H, W) slice for
    (B, 4) crop boxes: ``crop_box``, /255, antialiased bilinear to size (grey repeated to 3 channels)."""
    return np.stack([resize_aa(crop_box(img, b), size) for b in np.asarray(crop_boxes).reshape(-1, 4)])


def mask_box_on_grid(mask: np.ndarray, bbox: np.ndarray, new_hw: tuple[int, int], size: int) -> np.ndarray:
    """Bounding box (x0, y0, x1, y1) float32 of a (H, W) bool mask as seen on the resized grid.

    As the official propagation: the mask is resized with INTER_AREA to the encoder's resized size
    and the box taken there, which places its edges where the mask's pixels land on the grid
    (truncating the original box instead is up to one source pixel off: several grid pixels for
    small images). The mask is resized as 0/1, not as its label value (the official code resizes
    the label image, which makes the box depend on the label number). If the mask vanishes in the
    resize, the truncated original box ``bbox`` is used.
    """
    nh, nw = new_hw
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_AREA)
    ys, xs = np.nonzero(small)
    if not len(xs):
        h, w = mask.shape
        return box_to_grid(bbox, h, w, size)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def propagated_prompt(mask: np.ndarray, new_hw: tuple[int, int], size: int, margin: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The next slice's prompt from a non-empty (H, W) bool mask: (crop box (4,) int64 in original
    pixels, clipped to [0, W] x [0, H]; grid box (4,) float32, clipped to [0, S]), both the mask's
    bounding box widened by ``margin`` on each side."""
    h, w = mask.shape
    bb = tight_box(mask)
    pad = np.array([-margin, -margin, margin, margin])
    grid = np.clip(mask_box_on_grid(mask, bb, new_hw, size) + pad, 0, size).astype(np.float32)
    return clip_crop_box(bb + pad, h, w), grid


POINT_INPUTS = frozenset({"point_coords", "point_labels"})  # per-box graph inputs of a model with clicks
POINT_PAD = -1  # label of a padding point (SAM's "not a point"); 1 = foreground, 0 = background


def check_points(points: np.ndarray, labels: np.ndarray, n_boxes: int, dims: tuple[int, ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Validate click prompts given by a user or a file.

    points: (N, P, k) pixel indices in box-coordinate order, k = len(dims): x, y (2D) or x, y, z
    (3D), or (P, k) for N = 1; labels: (N, P) 1 foreground / 0 background / -1 padding (ignored);
    n_boxes: N; dims: the image size in the same order, (W, H) or (W, H, D). Returns (N, P, k)
    int64 (padding points set to 0) and (N, P) int64. Raises InputError for NaN, non-integral or
    out-of-image points, unknown labels or shapes that do not match the boxes.
    """
    pts, lab = np.asarray(points), np.asarray(labels)
    k = len(dims)
    for name, a in (("points", pts), ("point_labels", lab)):
        if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise InputError(f"{name} has dtype {a.dtype}; expected numbers")
    if pts.ndim == 2 and n_boxes == 1:
        pts, lab = pts[None], lab.reshape(1, -1)
    if pts.ndim != 3 or pts.shape[0] != n_boxes or pts.shape[2] != k:
        raise InputError(f"points has shape {pts.shape}; {n_boxes} box(es) need (N={n_boxes}, P, {k}) "
                         f"{', '.join('xyz'[:k])}")
    if lab.shape != pts.shape[:2]:
        raise InputError(f"point_labels has shape {lab.shape}; points {pts.shape} need {pts.shape[:2]}")
    if not (np.isfinite(pts).all() and np.isfinite(lab).all()):
        raise InputError("points or point_labels contain NaN or infinite values")
    if (pts != np.rint(pts)).any() or (lab != np.rint(lab)).any():
        raise InputError("points and point_labels must be whole numbers (pixel indices; labels 1, 0 or -1)")
    if not np.isin(lab, (1, 0, POINT_PAD)).all():
        raise InputError(f"point_labels holds {sorted(set(np.unique(lab).tolist()) - {1, 0, POINT_PAD})}; "
                         f"1 = foreground, 0 = background, -1 = padding")
    real = lab != POINT_PAD
    outside = real & ((pts < 0) | (pts >= np.array(dims, dtype=np.float64))).any(axis=-1)
    if outside.any():
        n, p = np.argwhere(outside)[0]
        at = ", ".join(f"{a}={v:g}" for a, v in zip("xyz", pts[n, p]))
        size = "x".join(map(str, dims))
        raise InputError(f"point {p + 1} of box {n + 1} ({at}) lies outside the image (size {size})")
    return np.where(real[..., None], pts, 0).astype(np.int64), lab.astype(np.int64)


def points_to_grid(points: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """(…, 2) x, y pixel indices of an (H, W) image -> float32 coordinates on the size-S grid.

    The point lands on the centre of its pixel: ``(c + 0.5) * S / max(H, W) - 0.5`` (the graph adds
    0.5, as for the box corners, so the positional encoding sees the pixel centre at any image size).
    """
    ratio = size / max(h, w)
    return ((np.asarray(points, dtype=np.float64) + 0.5) * ratio - 0.5).astype(np.float32)


def pad_points(points: list[np.ndarray], labels: list[np.ndarray], dim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt point lists of different lengths -> (B, P, dim) float32 and (B, P) int64 padded with
    label -1 (P = the longest list, at least 1, so that every prompt has a point slot)."""
    p = max([len(x) for x in labels] + [1])
    pts = np.zeros((len(points), p, dim), np.float32)
    lab = np.full((len(points), p), POINT_PAD, np.int64)
    for i, (xy, lb) in enumerate(zip(points, labels)):
        pts[i, : len(lb)] = np.asarray(xy, np.float32).reshape(-1, dim)
        lab[i, : len(lb)] = lb
    return pts, lab


def box_with_points(crop: np.ndarray, grid: np.ndarray, fg: np.ndarray, hw: tuple[int, int], size: int,
                    margin: int) -> tuple[np.ndarray, np.ndarray]:
    """A prompt's crop box (4,) (original pixels) and grid box (4,) widened to take in foreground
    clicks fg (K, 2) x, y with ``margin`` around them (a click outside the box says the object
    reaches there); both returned unchanged when K = 0. Crop box: int64 clipped to [0, W] x [0, H];
    grid box: float32 clipped to [0, S]."""
    if not len(fg):
        return crop, grid
    h, w = hw
    fg = np.asarray(fg, np.int64).reshape(-1, 2)
    lo, hi = fg.min(axis=0) - margin, fg.max(axis=0) + 1 + margin
    c = np.asarray(crop, np.int64)
    c = clip_crop_box(np.concatenate([np.minimum(c[:2], lo), np.maximum(c[2:], hi)]), h, w)
    gp = points_to_grid(fg, h, w, size)
    g = np.asarray(grid, np.float32)
    g = np.concatenate([np.minimum(g[:2], gp.min(axis=0) - margin), np.maximum(g[2:], gp.max(axis=0) + margin)])
    return c, np.clip(g, 0, size).astype(np.float32)


def jitter_box(grid: np.ndarray, crop: np.ndarray, shifts: np.ndarray, *, hw: tuple[int, int],
               size: int) -> tuple[np.ndarray, np.ndarray]:
    """Move each side of a prompt by ``shifts`` (4,) grid pixels, positive outward (training's box
    jitter, INT8 calibration's perturbed prompts).

    grid: (4,) grid box; crop: (4,) crop box in original pixels of an image of size hw = (H, W).
    Returns the grid box (4,) float32 clipped to [0, S] and the crop box (4,) int64 moved by the
    same shifts scaled to original pixels (``rint(shift * max(H, W) / S)``), clipped to
    [0, W] x [0, H]; both keep at least one pixel of width and height.
    """
    h, w = hw
    s = np.asarray(shifts, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64) + np.array([-s[0], -s[1], s[2], s[3]])
    g = np.clip(g, 0, size)
    g[2], g[3] = max(g[2], min(g[0] + 1, size)), max(g[3], min(g[1] + 1, size))
    d = np.rint(s * max(h, w) / size).astype(np.int64)
    c = clip_crop_box(np.asarray(crop, dtype=np.int64) + np.array([-d[0], -d[1], d[2], d[3]]), h, w)
    c[2], c[3] = max(c[2], min(c[0] + 1, w)), max(c[3], min(c[1] + 1, h))
    return g.astype(np.float32), c


def padding_points(boxes: int) -> dict[str, np.ndarray]:
    """The click inputs of a box-only prompt for a graph that takes clicks: one padding point per box
    (label -1), which the graph masks out, so the outputs are the box-only ones (README "Click prompts
    in the model"). Graphs without click inputs never read these names."""
    return {"point_coords": np.zeros((boxes, 1, 2), np.float32), "point_labels": np.full((boxes, 1), -1.0, np.float32)}


def decoder_feed(*, embeddings: np.ndarray, embedding_index: np.ndarray, boxes: np.ndarray,
                 crops: np.ndarray | None,
                 modality_index: np.ndarray, clip_features: np.ndarray | None = None,
                 points: np.ndarray | None = None, point_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The per-box graph's inputs, by the exported names, for B boxes.

    embeddings (K, C, E, E) float32, embedding_index (B,) int64 row of embeddings per box,
    boxes (B, 4) float32 on the grid, crops (B, 3, E, E) float32 (None or (B, 0) for a graph without a
    crops input: its crop CNN folded at export, ``Manifest.reads_crops``), modality_index (B,) int64 row of
    the model's modality table, clip_features (B, 512) float32 (models with a CLIP tower only),
    points (B, P, 2) x, y on the grid (:func:`points_to_grid`) and point_labels (B, P) (1 fg, 0 bg,
    -1 padding; :func:`pad_points`), fed as ``point_coords`` / ``point_labels`` float32, for models
    with point prompts only (without them such a model gets one padding point per box from the engine).
    """
    feed = {"image_embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
            "embedding_index": np.asarray(embedding_index, dtype=np.int64),
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "modality_index": np.asarray(modality_index, dtype=np.int64)}
    if crops is not None and np.shape(crops)[-1]:
        feed["crops"] = np.ascontiguousarray(crops, dtype=np.float32)
    if clip_features is not None:
        feed["clip_image_features"] = np.ascontiguousarray(clip_features, dtype=np.float32)
    if points is not None:
        feed["point_coords"] = np.ascontiguousarray(points, dtype=np.float32)
        feed["point_labels"] = np.asarray(point_labels, dtype=np.float32)
    return feed
