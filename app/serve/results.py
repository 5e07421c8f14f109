"""Response bodies: label maps as PNG, run-length JSON, NPZ or NIfTI, and slices as PNG; the Accept header.

Label maps are box indices (0 = background, 1..N), uint8 up to 255 boxes, else uint16 (a 16-bit PNG).
Run-length JSON: ``{"shape": [...], "dtype": "uint8", "rle": [v0, n0, v1, n1, ...]}``, runs of
equal values over the array in C order (row-major; for 3D z, then y, then x).
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np

PNG = "image/png"
JSON = "application/json"
NPZ = "application/x-npz"
NIFTI = "application/gzip"  # a .nii.gz file
# Other names clients use for the same bodies.
ALIASES = {"application/npz": NPZ, "application/octet-stream": NPZ, "application/x-nifti": NIFTI,
           "application/x-nifti-gz": NIFTI, "application/x-gzip": NIFTI}
SUFFIX = {PNG: ".png", JSON: ".json", NPZ: ".npz", NIFTI: ".nii.gz"}


def negotiate(accept: str | None, offers: tuple[str, ...]) -> str | None:
    """The first of ``offers`` (the default first) that an Accept header asks for; None if none fits.

    Types are taken in the order of their q values (ties: the header's order); ``*/*``, an empty
    header and a missing one give the default.
    """
    if not accept or not accept.strip():
        return offers[0]
    wanted: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept.split(",")):
        kind, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if kind and q > 0:
            wanted.append((-q, i, ALIASES.get(kind.lower(), kind.lower())))
    for _, _, kind in sorted(wanted):
        if kind == "*/*":
            return offers[0]
        if kind == "application/*":
            return next((o for o in offers if o.startswith("application/")), None)
        if kind == "image/*":
            return next((o for o in offers if o.startswith("image/")), None)
        if kind in offers:
            return kind
    return None


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) uint8/uint16 or (H, W, 3) uint8 RGB -> PNG bytes."""
    a = array[:, :, ::-1] if array.ndim == 3 else array  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(a))
    if not ok:
        raise RuntimeError(f"could not encode a PNG of shape {array.shape} {array.dtype}")
    return buf.tobytes()


def colour_png(labels: np.ndarray) -> bytes:
    """(H, W) uint8/uint16 labels -> an RGB PNG to look at: label i in the colour mcp-medsam's overlays
    give it (:func:`mcp_medsam.overlay.label_colour`), background black. A 0/1 label PNG looks black."""
    from ..overlay import label_colour

    values, index = np.unique(labels, return_inverse=True)
    lut = np.array([(0, 0, 0) if v == 0 else label_colour(int(v))[::-1] for v in values], np.uint8)  # BGR -> RGB
    return encode_png(lut[index.reshape(labels.shape)])


def run_lengths(labels: np.ndarray) -> list[int]:
    """[v0, n0, v1, n1, ...]: the runs of equal values of ``labels`` in C order."""
    flat = labels.ravel()
    if flat.size == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    return np.stack([flat[starts].astype(np.int64), lengths]).T.ravel().tolist()


def from_run_lengths(rle: list[int], shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """The inverse of :func:`run_lengths` (for clients written in Python, and the tests)."""
    pairs = np.asarray(rle, dtype=np.int64).reshape(-1, 2)
    return np.repeat(pairs[:, 0], pairs[:, 1]).astype(dtype).reshape(shape)


def labels_json(labels: np.ndarray, iou: list[float] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"labels": {"shape": list(labels.shape), "dtype": str(labels.dtype),
                                       "encoding": "rle", "rle": run_lengths(labels)}}
    if iou is not None:
        body["iou"] = [round(float(v), 6) for v in iou]
    return body


def labels_npz(labels: np.ndarray, spacing: tuple[float, ...] | None) -> bytes:
    """An NPZ with ``segs`` (as ``mcp-medsam predict`` writes) and ``spacing`` where known."""
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"segs": labels}
    if spacing is not None:
        arrays["spacing"] = np.asarray(spacing, np.float64)
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def can_write_nifti() -> bool:
    """NIfTI results need SimpleITK (the ``io`` extra)."""
    import importlib.util

    return importlib.util.find_spec("SimpleITK") is not None


def labels_nifti(labels: np.ndarray, like: Any, folder: Any) -> bytes:
    """A .nii.gz of the labels on the upload's grid and geometry (``like``: its MedicalImage), written
    through :func:`mcp_medsam.io.medical.write_labels` into the image's private folder."""
    from pathlib import Path

    from ..io.medical import write_labels

    path = write_labels(Path(folder) / "labels.nii.gz", labels, like)
    return path.read_bytes()
