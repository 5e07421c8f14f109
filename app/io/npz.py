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

from ..errors import InputError
from ..preprocess import check_image
from ..prompts import check_boxes, label_dtype


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
        return label_dtype(len(self.boxes))


def load_case(path: str | Path) -> Case:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})") from None
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise InputError("not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("imgs", "boxes") if k not in keys]
            if missing:
                raise InputError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'none'})")
            imgs = data["imgs"]
            boxes = data["boxes"]
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    except ValueError as exc:  # object arrays (allow_pickle=False) and malformed members
        raise InputError(f"unreadable array in the .npz file ({exc})") from None
    if boxes.ndim == 2 and boxes.shape[1] in (4, 6):
        width = boxes.shape[1]
    elif boxes.ndim == 1 and boxes.size in (4, 6):
        width = boxes.size
    elif boxes.size == 0:  # no boxes: the image decides (an (H, W, 3) image is 2D)
        width = 6 if imgs.ndim == 3 and imgs.shape[-1] != 3 else 4
    else:
        width = 0
    if width not in (4, 6):
        raise InputError(f"boxes has shape {boxes.shape}; expected (N, 4) for 2D or (N, 6) for 3D")
    is_3d = width == 6
    prefix = path.name.split("_")[0]
    if prefix in ("2DBox", "3DBox") and (prefix == "3DBox") != is_3d:
        raise InputError(f"boxes of {width} coordinates in a {prefix}_ case "
                        f"(2D boxes are x_min, y_min, x_max, y_max; 3D add z_min and z_max)")
    if is_3d and imgs.ndim != 3:
        raise InputError(f"imgs has shape {imgs.shape}; a 3D case (boxes of 6) needs (D, H, W)")
    if not is_3d and not (imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[2] in (1, 3))):
        raise InputError(f"imgs has shape {imgs.shape}; a 2D case (boxes of 4) needs (H, W, 3) or (H, W)")
    image = check_image(imgs, volume=is_3d, name="imgs")
    dims = (image.shape[2], image.shape[1], image.shape[0]) if is_3d else (image.shape[1], image.shape[0])
    return Case(name=path.name, image=image, boxes=check_boxes(boxes, dims), is_3d=is_3d)
