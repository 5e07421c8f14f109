"""Reading and validating one CVPR24 NPZ case: every bad input gets one clear, specific message.

2D cases: ``imgs`` (H, W, 3) or (H, W) and ``boxes`` (N, 4) as x_min, y_min, x_max, y_max.
3D cases: ``imgs`` (D, H, W) and ``boxes`` (N, 6) as x_min, y_min, z_min, x_max, y_max, z_max.
Coordinates are inclusive pixel indices. ``spacing`` is optional (inference does not use it).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_LABELS = np.iinfo(np.uint16).max


class CaseError(ValueError):
    """A problem with one input case; the message is shown to the user as is."""


@dataclass
class Case:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D
    boxes: np.ndarray  # (N, 4) or (N, 6) int64, clipped to the image
    is_3d: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image.shape[:2] if not self.is_3d else self.image.shape

    @property
    def label_dtype(self) -> type:
        return np.uint8 if len(self.boxes) <= 255 else np.uint16


def _as_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise CaseError(f"imgs has dtype {a.dtype}; expected uint8 (or numbers in 0..255)")
    if a.size == 0:
        raise CaseError(f"imgs is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise CaseError("imgs contains NaN or infinite values")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 255:
        raise CaseError(f"imgs values span {lo}..{hi}; expected 0..255")
    return np.rint(a).astype(np.uint8) if np.issubdtype(a.dtype, np.floating) else a.astype(np.uint8)


def _check_boxes(raw: np.ndarray, dims: tuple[int, ...], width: int) -> np.ndarray:
    """Validate and clip boxes. dims: (W, H) for 2D, (W, H, D) for 3D, in box-coordinate order."""
    if raw.dtype == np.bool_ or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise CaseError(f"boxes has dtype {raw.dtype}; expected numbers")
    if raw.ndim == 1 and raw.size == width:
        raw = raw[None]
    if raw.size == 0:
        return np.zeros((0, width), np.int64)
    if raw.ndim != 2 or raw.shape[1] != width:
        raise CaseError(f"boxes has shape {raw.shape}; a {'3D' if width == 6 else '2D'} case needs (N, {width})")
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raise CaseError("boxes contain NaN or infinite values")
    if len(raw) > MAX_LABELS:
        raise CaseError(f"{len(raw)} boxes; at most {MAX_LABELS} labels fit in uint16 segs")
    boxes = np.rint(raw).astype(np.int64)
    k = width // 2
    lo, hi = boxes[:, :k], boxes[:, k:]
    limit = np.array(dims, dtype=np.int64)
    axes = "xyz"
    for i, b in enumerate(boxes):
        for a in range(k):
            if hi[i, a] < lo[i, a]:
                what = "z_min > z_max" if a == 2 else f"{axes[a]}_max < {axes[a]}_min"
                raise CaseError(f"box {i + 1} {b.tolist()} is inverted ({what})")
            if a < 2 and hi[i, a] == lo[i, a]:
                raise CaseError(f"box {i + 1} {b.tolist()} is empty (zero {'width' if a == 0 else 'height'})")
        if (hi[i] < 0).any() or (lo[i] >= limit).any():
            raise CaseError(f"box {i + 1} {b.tolist()} lies wholly outside the image (size {'x'.join(map(str, dims))})")
    # Boxes partly outside are clipped to the image.
    return np.concatenate([np.clip(lo, 0, limit - 1), np.clip(hi, 0, limit - 1)], axis=1)


def load_case(path: str | Path) -> Case:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CaseError(f"cannot read the file ({exc.strerror})") from None
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise CaseError("not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("imgs", "boxes") if k not in keys]
            if missing:
                raise CaseError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'none'})")
            imgs = data["imgs"]
            boxes = data["boxes"]
    except CaseError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CaseError(f"not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    except ValueError as exc:  # object arrays (allow_pickle=False) and malformed members
        raise CaseError(f"unreadable array in the .npz file ({exc})") from None
    if boxes.ndim == 2 and boxes.shape[1] in (4, 6):
        width = boxes.shape[1]
    elif boxes.ndim == 1 and boxes.size in (4, 6):
        width = boxes.size
    elif boxes.size == 0:  # no boxes: the image decides (an (H, W, 3) image is 2D)
        width = 6 if imgs.ndim == 3 and imgs.shape[-1] != 3 else 4
    else:
        width = 0
    if width not in (4, 6):
        raise CaseError(f"boxes has shape {boxes.shape}; expected (N, 4) for 2D or (N, 6) for 3D")
    is_3d = width == 6
    prefix = path.name.split("_")[0]
    if prefix in ("2DBox", "3DBox") and (prefix == "3DBox") != is_3d:
        raise CaseError(f"boxes of {width} coordinates in a {prefix}_ case "
                        f"(2D boxes are x_min, y_min, x_max, y_max; 3D add z_min and z_max)")
    if is_3d:
        if imgs.ndim != 3:
            raise CaseError(f"imgs has shape {imgs.shape}; a 3D case (boxes of 6) needs (D, H, W)")
        d, h, w = imgs.shape
        dims: tuple[int, ...] = (w, h, d)
    else:
        if imgs.ndim == 3 and imgs.shape[2] == 1:
            imgs = imgs[:, :, 0]
        if imgs.ndim == 2:
            imgs = np.repeat(imgs[:, :, None], 3, axis=2)
        if imgs.ndim != 3 or imgs.shape[2] != 3:
            raise CaseError(f"imgs has shape {imgs.shape}; a 2D case (boxes of 4) needs (H, W, 3) or (H, W)")
        h, w = imgs.shape[:2]
        dims = (w, h)
    if min(imgs.shape) == 0:
        raise CaseError(f"imgs is empty (shape {imgs.shape})")
    image = _as_uint8(imgs)
    return Case(name=path.name, image=np.ascontiguousarray(image), boxes=_check_boxes(boxes, dims, width), is_3d=is_3d)
