"""Medical images as researchers hold them: NIfTI, NRRD, MetaImage, DICOM series, PNG/JPEG/BMP/TIFF.

Reading, the challenge's intensity conversion to uint8, boxes from a label image, and label images
written back in the input's geometry. One array convention throughout: volumes ``(z, y, x)``
(slice, row, column), 2D images ``(H, W)`` or ``(H, W, 3)`` RGB; boxes are voxel indices of that
array, x = column, y = row, z = slice, max inclusive (the CVPR24 NPZ convention).

Readers: SimpleITK for volumes and DICOM (the optional ``io`` extra; imported only when such a
file is read), OpenCV for 2D pictures (a runtime dependency: 2D files need no extra). SimpleITK
reads every volume format and DICOM series with the geometry conventions of ITK, which the
viewers researchers use (3D Slicer, ITK-SNAP) share; for pictures OpenCV decodes the sample set's
JPEG bit for bit as the challenge converter did (ITK's JPEG decoder differs by up to 20 grey levels)
and reads 1-bit BMP masks, which ITK refuses.

Geometry (``spacing``, ``origin``, ``direction``) is in SimpleITK's order, (x, y, z), with the
direction cosines row-major; ``spacing_zyx`` gives the NPZ order.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, SegmentationError
from ..locale_guard import keep_locale
from ..modality import accepted_token, canonical
from . import headers
from .npz import DEFAULT_MAX_IMAGE_BYTES

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NPZ_SUFFIX = ".npz"
# Accepted input file suffixes (lower case, longest first so ".nii.gz" wins over ".nii"); a folder
# is read as a DICOM series.
SUFFIXES: tuple[str, ...] = tuple(sorted((*VOLUME_SUFFIXES, *PICTURE_SUFFIXES, NPZ_SUFFIX), key=len, reverse=True))
# What label images are written as. JPEG is lossy (labels would not survive); .mhd/.nhdr are
# header + data pairs, which cannot be replaced in one atomic rename: .mha/.nrrd are the same formats in one file.
OUTPUT_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".bmp", ".npz")

FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage",
           ".mhd": "metaimage", ".dcm": "dicom", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp",
           ".tif": "tiff", ".tiff": "tiff", ".npz": "npz"}
_ITK_IO = {"nifti": "NiftiImageIO", "nrrd": "NrrdImageIO", "metaimage": "MetaImageIO", "dicom": "GDCMImageIO"}

CT_WINDOW = (40.0, 400.0)  # level, width in HU (the challenge's CT conversion)
PERCENTILES = (0.5, 99.5)
MIN_OBJECT_SIZE = 10  # the challenge dropped labels of fewer pixels/voxels
JPEG_MASK_THRESHOLD = 127.0  # JPEG cannot hold exact label values; the challenge thresholded its JPEG masks here
MAX_LABEL_VALUE = int(np.iinfo(np.uint16).max)


@dataclass(frozen=True)
class MedicalImage:
    """One image or label image as read, with what writing a result back in its geometry needs.

    array: native values; volumes (z, y, x), 2D (H, W) or (H, W, 3) RGB (any numeric dtype; label
    images from :func:`read_labels` are uint8/uint16). is_3d: a volume (also a one-slice volume).
    spacing / origin / direction: SimpleITK order (x, y[, z]) in mm, direction cosines row-major
    (d x d); None for pictures and NPZ cases, which carry no geometry. format: ``nifti``, ``nrrd``,
    ``metaimage``, ``dicom``, ``png``, ``jpeg``, ``bmp``, ``tiff`` or ``npz``. series_uid: the
    DICOM SeriesInstanceUID. boxes: an NPZ case's own (N, 4|6) int64 boxes (else None).
    """

    array: np.ndarray
    is_3d: bool
    source: Path
    format: str
    spacing: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None
    series_uid: str | None = None
    boxes: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The voxel grid: (D, H, W) for a volume, (H, W) for a 2D image."""
        return tuple(self.array.shape if self.is_3d else self.array.shape[:2])

    @property
    def has_geometry(self) -> bool:
        return self.spacing is not None

    @property
    def spacing_zyx(self) -> tuple[float, ...] | None:
        """Spacing in the array's axis order (the NPZ ``spacing`` convention)."""
        return None if self.spacing is None else tuple(reversed(self.spacing))

    @property
    def name(self) -> str:
        return stem(self.source)


# ---------------------------------------------------------------- names


def suffix(path: str | Path) -> str:
    """The known suffix of a file name, lower case (``.nii.gz`` as one); ``""`` when none matches."""
    low = Path(path).name.lower()
    return next((s for s in SUFFIXES if low.endswith(s)), "")


def stem(path: str | Path) -> str:
    """A file name without its known suffix (``case.nii.gz`` -> ``case``); a folder's name as it is."""
    p = Path(path)
    s = "" if p.is_dir() else suffix(p)
    return p.name[: len(p.name) - len(s)] if s else p.name


def output_suffix(path: str | Path) -> str:
    """The suffix a result for this input gets by default: the input's own format where labels can be
    written in it (``.nhdr`` -> ``.nrrd``, ``.mhd`` -> ``.mha``), ``.nii.gz`` for DICOM, ``.png`` for JPEG."""
    p = Path(path)
    s = "" if p.is_dir() else suffix(p)
    return {"": ".nii.gz", ".dcm": ".nii.gz", ".nhdr": ".nrrd", ".mhd": ".mha", ".jpg": ".png",
            ".jpeg": ".png"}.get(s, s)


# ---------------------------------------------------------------- reading


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise SegmentationError("reading and writing NIfTI, NRRD, MetaImage and DICOM needs SimpleITK: "
                                "pip install 'mcp-medsam[io]'") from None
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's scan warnings are not for the user
    return sitk


def _itk_reason(exc: BaseException) -> str:
    """ITK's multi-line exception text reduced to its one line of reason."""
    text = str(exc)
    m = re.search(r"(?:ITK ERROR|sitk::ERROR):\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?(.+)", text)
    reason = (m.group(1) if m else text.strip().splitlines()[-1] if text.strip() else exc.__class__.__name__)
    return reason.strip()[:300]


@keep_locale()
def read_image(path: str | Path, *, series: str | None = None,
               max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> MedicalImage:
    """Read an image file or a DICOM series folder; every problem is one InputError line.

    path: ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``, ``.dcm``, a folder holding a
    DICOM image series (subfolders included; RTSTRUCT/SEG objects are skipped), ``.png``/``.jpg``/
    ``.jpeg``/``.bmp``/``.tif``/``.tiff`` or a CVPR24 ``.npz`` case. series: the SeriesInstanceUID
    to read from a folder holding several series. max_bytes: the largest decoded image (native
    values, all channels), checked from the header before anything is decoded (TooLarge above it;
    None: no limit).

    Hostile files are refused from their headers (:mod:`mcp_medsam.io.headers`): a header naming
    another file for its data (NRRD ``data file``, MetaImage ``ElementDataFile`` other than LOCAL,
    NIfTI pair headers), a NIfTI shorter than its header declares or holding NaN/infinite values,
    anything that is not a regular file (a FIFO would block the reader).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror})") from None
    if mode is not None and stat.S_ISDIR(mode):
        return _read_dicom_series(path, series, max_bytes)
    if series is not None:
        raise InputError("--series applies to a DICOM series folder, not to a file")
    if mode is None:
        raise InputError("no such file or folder")
    if not stat.S_ISREG(mode):
        raise InputError(f"{_kind(mode)}, not a regular file; refused")
    s = suffix(path)
    if not s:
        raise InputError(f"unknown file type; accepted: {', '.join(sorted(SUFFIXES))} "
                         f"or a DICOM series folder")
    fmt = FORMATS[s]
    if fmt == "npz":
        return _read_npz(path, max_bytes)
    if s in PICTURE_SUFFIXES:
        return _read_picture(path, fmt, max_bytes)
    return _read_volume(path, fmt, max_bytes)


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")


def _read_npz(path: Path, max_bytes: int | None) -> MedicalImage:
    from .npz import load_case

    case = load_case(path, max_image_bytes=max_bytes if max_bytes is not None else 1 << 62)
    return MedicalImage(array=case.image, is_3d=case.is_3d, source=path, format="npz", boxes=case.boxes)


def _read_picture(path: Path, fmt: str, max_bytes: int | None) -> MedicalImage:
    import cv2

    headers.check_picture(path, fmt, max_bytes)  # the declared grid against the limit, before decoding
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})") from None
    if fmt == "tiff" and data.size:
        pages = cv2.imcount(str(path)) if hasattr(cv2, "imcount") else 1
        if pages > 1:
            raise InputError(f"a TIFF stack of {pages} pages; save a volume as NIfTI, NRRD or MHA")
    # IMREAD_UNCHANGED keeps 16-bit and float values, and ignores EXIF rotation: the pixel grid stays
    # the one a label image drawn on the file has.
    a = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if a is None:
        raise InputError(f"not a readable {fmt.upper()} file")
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]  # alpha is no part of the image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[:, :, ::-1]  # OpenCV decodes BGR; the model takes RGB
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise InputError(f"a picture of shape {a.shape}; expected grey or RGB")
    return MedicalImage(array=np.ascontiguousarray(a), is_3d=False, source=path, format=fmt)


def _from_sitk(img: Any, path: Path, fmt: str, series_uid: str | None = None) -> MedicalImage:
    """A SimpleITK image (already checked to be 2D or 3D) as a MedicalImage."""
    sitk = _sitk()
    a = sitk.GetArrayFromImage(img)  # (z, y, x[, components])
    if np.iscomplexobj(a):
        raise InputError("complex pixel values; expected real numbers")
    dim = img.GetDimension()
    comps = img.GetNumberOfComponentsPerPixel()
    if comps > 1:
        if dim == 3:
            raise InputError(f"a volume of {comps}-component pixels; expected one value per voxel")
        if comps not in (3, 4):
            raise InputError(f"a 2D image of {comps}-component pixels; expected grey or RGB")
        a = a[:, :, :3]
    return MedicalImage(array=np.ascontiguousarray(a), is_3d=dim == 3, source=path, format=fmt,
                        spacing=tuple(float(v) for v in img.GetSpacing()),
                        origin=tuple(float(v) for v in img.GetOrigin()),
                        direction=tuple(float(v) for v in img.GetDirection()), series_uid=series_uid)


def _declared_bytes(sitk: Any, reader: Any) -> tuple[int, str]:
    """The decoded bytes an ImageFileReader's header information declares, and the grid as text."""
    size = reader.GetSize()
    bits = re.findall(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    item = (int(bits[0]) // 8 if bits else 8) * (2 if "complex" in sitk.GetPixelIDValueAsString(reader.GetPixelID())
                                                  else 1)
    nbytes = int(np.prod(size, dtype=np.int64)) * max(reader.GetNumberOfComponents(), 1) * item
    return nbytes, "x".join(map(str, size))


def _read_volume(path: Path, fmt: str, max_bytes: int | None) -> MedicalImage:
    # Refused from the header text, before SimpleITK opens anything the header names.
    if fmt == "nrrd":
        headers.check_nrrd(path)
    elif fmt == "metaimage":
        headers.check_metaimage(path)
    nifti = headers.nifti_header(path) if fmt == "nifti" else None
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_ITK_IO[fmt])  # the format the suffix names, not a guess from the content
    try:
        reader.ReadImageInformation()
        nbytes, grid = _declared_bytes(sitk, reader)
        headers.check_size(nbytes, max_bytes, f"an image of {grid} (x first)")
        if nifti is not None:
            headers.check_nifti_data(path, nifti)  # ITK fills a short file with zeros and NaN with 0
        size = reader.GetSize()
        if len(size) == 4 and size[3] == 1:
            reader.SetExtractIndex((0, 0, 0, 0))
            reader.SetExtractSize((*size[:3], 0))  # a 4D file of one volume: that volume
        elif len(size) not in (2, 3):
            dims = "x".join(map(str, size))
            raise InputError(f"a {len(size)}D image (size {dims}, x first); segment takes a 2D image or "
                             f"a 3D volume: extract one volume (time point or channel) first")
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"not a readable {fmt} file ({_itk_reason(exc)})") from None
    return _from_sitk(img, path, fmt)


def _series_info(sitk: Any, first_file: str) -> str:
    """A series' description for the user: its SeriesDescription and modality, as the first file has them."""
    r = sitk.ImageFileReader()
    r.SetFileName(first_file)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return ""
    parts = [r.GetMetaData(k).strip() for k in ("0008|0060", "0008|103e") if r.HasMetaDataKey(k)]
    return " ".join(p for p in parts if p)


@keep_locale()
def dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> its image files, ordered by slice position, for the image series in a folder
    and its subfolders (objects without image data, such as RTSTRUCT, belong to none)."""
    sitk = _sitk()
    folder = Path(folder)
    uids: list[str] = []
    for d, _, names in sorted(os.walk(folder)):
        for name in names:  # GDCM opens every file it scans: a FIFO would block it for ever
            try:
                mode = os.stat(os.path.join(d, name)).st_mode
            except OSError:
                continue  # a broken link: GDCM skips what it cannot open
            if not stat.S_ISREG(mode):
                rel = os.path.relpath(os.path.join(d, name), folder)
                raise InputError(f"the folder holds {rel}, {_kind(mode)}; refused (only regular files are read)")
        uids += [u for u in sitk.ImageSeriesReader.GetGDCMSeriesIDs(d) if u not in uids]
    return {u: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u, recursive=True)) for u in uids}


def _read_dicom_series(folder: Path, series: str | None, max_bytes: int | None) -> MedicalImage:
    sitk = _sitk()
    found = dicom_series(folder)
    if not found:
        raise InputError("no DICOM image series in the folder (RTSTRUCT, SEG and other "
                         "objects without image data are not images)")
    if series is None and len(found) > 1:
        listing = "; ".join(f"{u} ({len(f)} files{', ' + d if (d := _series_info(sitk, f[0])) else ''})"
                            for u, f in found.items())
        raise InputError(f"{len(found)} DICOM series in the folder; pick one with --series UID: "
                         f"{listing}")
    uid = series if series is not None else next(iter(found))
    if uid not in found:
        raise InputError(f"no DICOM series {uid}; the folder holds {', '.join(found)}")
    _check_series_size(sitk, found[uid], max_bytes)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(found[uid])  # GDCM applies each slice's rescale slope and intercept (CT: HU)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM series {uid} ({_itk_reason(exc)})") from None
    _check_even_slices(reader, img)
    return _from_sitk(img, folder, "dicom", series_uid=uid)


def _check_series_size(sitk: Any, files: list[str], max_bytes: int | None) -> None:
    """TooLarge when a series' files declare (Rows x Columns x frames per file, summed) more decoded
    bytes than ``max_bytes``: checked from every file's header, since ITK decodes each slice as its
    own header sizes it before it compares slices."""
    total, grids = 0, set()
    for name in files:
        r = sitk.ImageFileReader()
        r.SetFileName(name)
        r.SetImageIO("GDCMImageIO")
        try:
            r.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"cannot read DICOM file {Path(name).name} ({_itk_reason(exc)})") from None
        nbytes, grid = _declared_bytes(sitk, r)
        total += nbytes
        grids.add(grid)
        headers.check_size(total, max_bytes, f"a series of {len(files)} files ({', '.join(sorted(grids))}, x first)")


def _check_even_slices(reader: Any, img: Any) -> None:
    """InputError when a series' slice positions are not evenly spaced (a missing slice): ITK would
    only warn and give the volume one spacing, so the geometry written back would be wrong."""
    key = "0020|0032"  # ImagePositionPatient
    n = len(reader.GetFileNames())
    if n < 3 or not all(reader.HasMetaDataKey(i, key) for i in range(n)):
        return
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(n)])
    except ValueError:
        return
    normal = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    gaps = np.diff(np.sort(pos @ normal))
    if gaps.max() - gaps.min() > 0.01 * abs(gaps.mean()) + 1e-3:
        raise InputError(f"the series' slices are not evenly spaced (gaps of {gaps.min():.3g} to {gaps.max():.3g} mm: "
                         f"a missing slice?)")


# ---------------------------------------------------------------- intensities


def _scale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi], map to 0..255, round half to even; float64 arithmetic (the converter's),
    one slice at a time so a large volume needs no float64 copy of itself."""
    out = np.empty(a.shape, np.uint8)
    if hi <= lo:  # a constant image: what is above the bound is white
        out[...] = np.where(a > lo, 255, 0)
        return out
    for i in range(a.shape[0]) if a.ndim == 3 else [slice(None)]:
        x = np.clip(a[i].astype(np.float64), lo, hi)
        out[i] = np.rint((x - lo) / (hi - lo) * 255.0)
    return out


def _percentile_bounds(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, PERCENTILES)
    return float(lo), float(hi)


def _is(modality: str, category: str) -> bool:
    return canonical(accepted_token(modality)) == category


def to_uint8(image: MedicalImage, modality: str, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """The challenge's conversion of native values to what the segmenter takes.

    Returns (D, H, W) uint8 for a volume, (H, W, 3) uint8 for a 2D image (grey copied to 3 channels).
    Rules (``../shared/data/sample/SOURCES.md``): ``window`` (level, width) given: clip to
    level +- width/2, then 0..255. Else CT volumes: window L40/W400 HU; other volumes (MR, PET, ...):
    clipped to the 0.5..99.5 percentiles of the voxels above zero, then 0..255 (zero stays zero); 2D
    8-bit images as they are, except grey microscopy; 16-bit, float and grey microscopy 2D images:
    clipped to the 0.5..99.5 percentiles of the image. An NPZ case is already 0..255 and is kept.
    Raises InputError for NaN/infinite values, no voxel above zero, a window of width <= 0, or an
    unknown modality.
    """
    a = image.array
    accepted_token(modality)  # an unknown modality fails here, with the accepted list
    if image.format == "npz":
        if window is not None:
            raise InputError("an .npz case holds 0..255 images already; a window does not apply")
        out = a
    else:
        if not np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_:
            raise InputError(f"pixel type {a.dtype}; expected numbers")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise InputError("NaN or infinite values")
        if window is not None:
            level, width = (float(v) for v in window)
            if not width > 0:
                raise InputError(f"window width {width:g} must be above zero")
            out = _scale(a, level - width / 2, level + width / 2)
        elif image.is_3d and _is(modality, "CT"):
            out = _scale(a, CT_WINDOW[0] - CT_WINDOW[1] / 2, CT_WINDOW[0] + CT_WINDOW[1] / 2)
        elif image.is_3d:
            positive = a[a > 0]
            if not positive.size:
                raise InputError("no voxel above zero to take percentiles of; "
                                 "pass a window (--window LEVEL,WIDTH)")
            # lo > 0, so every voxel at or below zero maps to 0.
            out = _scale(a, *_percentile_bounds(positive))
        elif a.dtype == np.uint8 and not (a.ndim == 2 and _is(modality, "Microscopy")):
            out = a
        else:
            out = _scale(a, *_percentile_bounds(a))
    if not image.is_3d and out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


# ---------------------------------------------------------------- label images


@keep_locale()
def read_labels(path: str | Path, *, threshold: float | None = None, series: str | None = None,
                max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> MedicalImage:
    """A label image: the same file types as :func:`read_image` (an ``.npz`` holds it as ``gts`` or
    ``segs``), values 0 = background, 1.. = labels; returned as uint8, or uint16 above 255.

    threshold: binarise (values > threshold are label 1); a JPEG is thresholded at 127 unless told
    otherwise (its compression blurs label values). Colour label images must have equal channels.
    Raises InputError for negative, fractional or too large (> 65535) values; every message starts
    with ``label image NAME:``. max_bytes: as :func:`read_image`.
    """
    path = Path(path)
    try:
        image = _read_label_file(path, series, max_bytes)
        return _as_labels(image, threshold)
    except InputError as exc:
        raise InputError(f"label image {path.name}: {exc}") from None


# A soft mask: a uint8 picture of at least this many grey values whose top value holds at least half
# of the non-zero pixels (the object), the other values rare (its blurred or anti-aliased edge).
SOFT_MASK_VALUES = 16
# A picture, not a label map: of this many distinct values or more, with more than PICTURE_CHANGES of
# the horizontally neighbouring pixel pairs (at least one non-zero) differing. Label maps change only
# at region borders (measured on the sample label images: 0.03 to 0.20; a blurred mask 0.18), pictures
# nearly everywhere (0.85 to 0.98: X-ray, MR, microscopy, dermoscopy images).
PICTURE_VALUES = 8
PICTURE_CHANGES = 0.5
# More distinct values than a label map plausibly has, in any type (each would become a box).
MAX_PROMPT_LABELS = 1024


def neighbour_changes(labels: np.ndarray) -> float:
    """The fraction of horizontally neighbouring pixel pairs, among those with a non-zero pixel, whose
    values differ; labels (H, W) or (D, H, W), one slice at a time (no copy of a whole volume)."""
    differ = pairs = 0
    for a in (labels if labels.ndim == 3 else [labels]):
        left, right = a[:, :-1], a[:, 1:]
        some = (left != 0) | (right != 0)
        differ += int(np.count_nonzero((left != right) & some))
        pairs += int(np.count_nonzero(some))
    return differ / pairs if pairs else 0.0


@keep_locale()
def read_prompt_labels(path: str | Path, *, threshold: float | None = None, series: str | None = None,
                       max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES, notes: list[str] | None = None
                       ) -> MedicalImage:
    """A label image whose labels become box prompts (``segment --boxes-from``): :func:`read_labels`,
    judged first as what the file looks like.

    - A soft mask (uint8, :data:`SOFT_MASK_VALUES` or more grey values, the top one holding at least
      half of the non-zero pixels, constant inside like a label map) without ``threshold`` is
      thresholded at half its range, with a note: its grey edge values are no labels.
    - Refused with the reason: a colour picture; a picture (:data:`PICTURE_VALUES` or more values,
      neighbouring pixels differing nearly everywhere: :func:`neighbour_changes` above
      :data:`PICTURE_CHANGES`); more than :data:`MAX_PROMPT_LABELS` distinct values; float values
      that are not whole numbers; negative values.
    - ``threshold`` applies only where a value lies above it: a 0/1 or 0..N label map is kept as it
      is (with a note), so one threshold can serve a batch that mixes soft masks and label maps.

    notes: where the one-line notes go. Returns uint8/uint16 labels as :func:`read_labels`.
    """
    path = Path(path)
    notes = notes if notes is not None else []
    try:
        image = _read_label_file(path, series, max_bytes)
        a = image.array
        if not image.is_3d and a.ndim == 3 and not (np.array_equal(a[:, :, 0], a[:, :, 1])
                                                     and np.array_equal(a[:, :, 0], a[:, :, 2])):
            raise InputError("a colour picture (its channels differ), not a label image; labels are one "
                             "grey value per pixel")
        grey = a[:, :, 0] if not image.is_3d and a.ndim == 3 else a
        if threshold is None and image.format == "jpeg":
            threshold = JPEG_MASK_THRESHOLD
        if threshold is not None:
            if grey.size and np.issubdtype(grey.dtype, np.number) and not (grey > threshold).any():
                notes.append(f"--mask-threshold {threshold:g} not applied to {path.name}: no value lies above it "
                             f"(values {grey.min():g}..{grey.max():g} are taken as labels)")
                threshold = None
            return _as_labels(image, threshold)
        if grey.dtype == np.uint8 and grey.size:
            counts = np.bincount(grey.ravel(), minlength=256)
            values = np.flatnonzero(counts[1:]) + 1
            labelled = int(counts[1:].sum())
            if (len(values) >= SOFT_MASK_VALUES and counts[values[-1]] * 2 >= labelled
                    and neighbour_changes(grey) <= PICTURE_CHANGES):
                lo, hi = int(grey.min()), int(values[-1])
                half = (lo + hi) / 2
                notes.append(f"{path.name} looks like a soft mask ({len(values)} grey values, most of them rare): "
                             f"thresholded at half its range, values above {half:g} are label 1 "
                             f"(--mask-threshold T to choose)")
                return _as_labels(image, half)
        labels = _as_labels(image, None)
        n = len(np.unique(labels.array)) - 1 if labels.array.size else 0
        if n >= PICTURE_VALUES and (changes := neighbour_changes(labels.array)) > PICTURE_CHANGES:
            raise InputError(f"a picture, not a label image: {n} distinct values, and {changes:.0%} of neighbouring "
                             f"pixels differ (in a label map only region borders do); a soft mask? binarise it "
                             f"with --mask-threshold T")
        if n > MAX_PROMPT_LABELS:
            raise InputError(f"{n} distinct label values, more than a label image plausibly has "
                             f"({MAX_PROMPT_LABELS}); an image given as labels? (--mask-threshold T binarises it)")
        return labels
    except InputError as exc:
        raise InputError(f"label image {path.name}: {exc}") from None


def _read_label_file(path: Path, series: str | None, max_bytes: int | None) -> MedicalImage:
    if not path.is_dir() and suffix(path) == NPZ_SUFFIX:
        return _read_npz_labels(path)
    return read_image(path, series=series, max_bytes=max_bytes)


def _as_labels(image: MedicalImage, threshold: float | None) -> MedicalImage:
    """An image's values as labels: binarised above ``threshold``, else checked to be whole numbers
    0..65535 and stored as uint8/uint16 (a JPEG is thresholded at 127 unless told otherwise)."""
    a = image.array
    if not image.is_3d and a.ndim == 3:
        if not (np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 0], a[:, :, 2])):
            raise InputError("a colour label image with different channels; expected grey labels")
        a = a[:, :, 0]
    if threshold is None and image.format == "jpeg":
        threshold = JPEG_MASK_THRESHOLD
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"label pixel type {a.dtype}; expected integers")
    if threshold is not None:
        a = (a > threshold).astype(np.uint8)
    else:
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or not np.array_equal(a, np.floor(a)):
                raise InputError("fractional values; labels are whole numbers "
                                 "(a probability map? binarise it with --mask-threshold)")
        if a.dtype != np.bool_ and a.size and a.min() < 0:
            raise InputError(f"negative label values ({a.min():g}); labels are 0 (background) or above")
        top = a.max() if a.size else 0
        if top > MAX_LABEL_VALUE:
            raise InputError(f"label value {top:g} is above {MAX_LABEL_VALUE}")
        a = a.astype(np.uint8 if top <= 255 else np.uint16)
    return MedicalImage(array=np.ascontiguousarray(a), is_3d=image.is_3d, source=image.source, format=image.format,
                        spacing=image.spacing, origin=image.origin, direction=image.direction,
                        series_uid=image.series_uid)


def _read_npz_labels(path: Path) -> MedicalImage:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in ("gts", "segs") if k in data.files), None)
            if key is None:
                raise InputError(f"no 'gts' or 'segs' label array (has: {', '.join(data.files) or 'none'})")
            a = data[key]
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"not a readable .npz file ({exc.__class__.__name__})") from None
    if a.ndim not in (2, 3):
        raise InputError(f"labels of shape {a.shape}; expected (H, W) or (D, H, W)")
    return MedicalImage(array=a, is_3d=a.ndim == 3, source=path, format="npz")


def _grid(image: MedicalImage) -> str:
    return "x".join(map(str, image.shape)) + (" (z, y, x)" if image.is_3d else " (rows, columns)")


def check_same_grid(labels: MedicalImage, image: MedicalImage) -> None:
    """InputError unless ``labels`` lies on ``image``'s voxel grid: the same shape and, where both
    files carry geometry, the same spacing, origin and direction (to a thousandth of a voxel; a
    NIfTI stores them as float32)."""
    if labels.is_3d != image.is_3d or labels.shape != image.shape:
        raise InputError(f"label image {labels.source.name} is {_grid(labels)}, the image {_grid(image)}: "
                         f"not the same grid")
    if not (labels.has_geometry and image.has_geometry):
        return
    sp = np.asarray(image.spacing)
    if not np.allclose(labels.spacing, sp, rtol=1e-4, atol=0):
        raise InputError(f"label image {labels.source.name} has spacing {_fmt(labels.spacing)} mm, the image "
                         f"{_fmt(image.spacing)}: not the same grid")
    if not np.allclose(labels.origin, image.origin, rtol=0, atol=1e-3 * float(sp.min())):
        raise InputError(f"label image {labels.source.name} has origin {_fmt(labels.origin)} mm, the image "
                         f"{_fmt(image.origin)}: not the same grid")
    if not np.allclose(labels.direction, image.direction, rtol=0, atol=1e-4):
        raise InputError(f"label image {labels.source.name} has direction {_fmt(labels.direction)}, the image "
                         f"{_fmt(image.direction)}: not the same grid")


def _fmt(values: tuple[float, ...] | None) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in (values or ())) + ")"


@dataclass(frozen=True)
class LabelBoxes:
    """Per label value of a label image: its tight box, its value and its size.

    boxes: (N, 4) ``x0, y0, x1, y1`` or (N, 6) ``x0, y0, z0, x1, y1, z1`` int64, inclusive (the
    NPZ convention; a label in several parts gets one box around all of them); values: (N,) the
    label values, ascending; sizes: (N,) int64 pixel or voxel counts.
    """

    boxes: np.ndarray
    values: np.ndarray
    sizes: np.ndarray

    def at_least(self, min_size: int) -> LabelBoxes:
        keep = self.sizes >= min_size
        return LabelBoxes(self.boxes[keep], self.values[keep], self.sizes[keep])


def label_boxes(labels: np.ndarray) -> LabelBoxes:
    """Every label value of an (H, W) or (D, H, W) integer label image (0 = background) with its box."""
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise InputError(f"labels of shape {labels.shape}; expected (H, W) or (D, H, W)")
    width = 2 * labels.ndim
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    if not where.size:
        return LabelBoxes(np.zeros((0, width), np.int64), np.zeros(0, labels.dtype), np.zeros(0, np.int64))
    vals = flat[where]
    order = np.argsort(vals, kind="stable")
    vals, where = vals[order], where[order]
    values, starts, sizes = np.unique(vals, return_index=True, return_counts=True)
    coords = np.unravel_index(where, labels.shape)  # (z,) y, x
    lo = [np.minimum.reduceat(c, starts) for c in coords]
    hi = [np.maximum.reduceat(c, starts) for c in coords]
    xyz = [2, 1, 0] if labels.ndim == 3 else [1, 0]  # array axes (z, y, x) -> box order x, y, z
    boxes = np.stack([lo[i] for i in xyz] + [hi[i] for i in xyz], axis=1).astype(np.int64)
    return LabelBoxes(boxes, values, sizes.astype(np.int64))


def boxes_from_labels(labels: np.ndarray, *, min_size: int = MIN_OBJECT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The challenge's box prompts of a label image: one tight inclusive box per label value.

    labels: (H, W) or (D, H, W) integers, 0 = background. Returns ((N, 4) or (N, 6) int64 boxes,
    (N,) label values ascending); labels of fewer than ``min_size`` pixels/voxels get no box (the
    challenge dropped them). Raises InputError when no label is left.
    """
    every = label_boxes(labels)
    kept = every.at_least(min_size)
    if not len(kept.values):
        if len(every.values):
            raise InputError(f"no label has {min_size} or more pixels (largest: {int(every.sizes.max())})")
        raise InputError("the label image is empty (every value is 0)")
    return kept.boxes, kept.values


# ---------------------------------------------------------------- writing


def label_suffix(path: str | Path) -> str:
    """The suffix of a label image to write (one of OUTPUT_SUFFIXES), or InputError saying why not."""
    name = Path(path).name
    low = name.lower()
    s = next((x for x in OUTPUT_SUFFIXES if low.endswith(x)), "")
    if not s:
        why = " (JPEG is lossy: labels would not survive)" if low.endswith((".jpg", ".jpeg")) else \
            " (a header + data pair: use .mha or .nrrd, the same formats in one file)" \
            if low.endswith((".mhd", ".nhdr")) else ""
        raise InputError(f"cannot write labels as {name}{why}; use one of {', '.join(OUTPUT_SUFFIXES)}")
    return s


@keep_locale()
def write_labels(path: str | Path, labels: np.ndarray, like: MedicalImage) -> Path:
    """Write a label image atomically, in the format its suffix names, on ``like``'s grid and geometry.

    labels: (D, H, W) for a volume or (H, W) for a 2D image, non-negative integers; stored as uint8,
    or uint16 above 255. Suffixes: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` (volumes and 2D; the
    spacing, origin and direction of ``like``, DICOM series included), ``.png``, ``.tif``,
    ``.tiff``, ``.bmp`` (2D; BMP 8-bit only), ``.npz`` (key ``segs``, as ``predict`` writes).
    Returns the path. Raises InputError for a suffix or shape that cannot hold the labels.
    """
    from .atomic import atomic_file, write_npz

    path = Path(path)
    s = label_suffix(path)
    labels = np.asarray(labels)
    if tuple(labels.shape) != like.shape:
        raise InputError(f"labels of shape {labels.shape} for an image of {_grid(like)}")
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABEL_VALUE):
        raise InputError(f"label values {labels.min()}..{labels.max()} do not fit 0..{MAX_LABEL_VALUE}")
    labels = labels.astype(np.uint8 if not labels.size or labels.max() <= 255 else np.uint16)
    if s == NPZ_SUFFIX:
        write_npz(path, segs=labels)
        return path
    if s in PICTURE_SUFFIXES:
        import cv2

        if like.is_3d:
            raise InputError(f"cannot write a volume as {s}; use .nii.gz, .nrrd or .mha")
        if s == ".bmp" and labels.dtype != np.uint8:
            raise InputError(f"BMP holds 8-bit labels; label {labels.max()} needs .png or .tif")
        ok, buf = cv2.imencode(s, labels)
        if not ok:
            raise InputError(f"cannot encode labels as {s}")
        with atomic_file(path) as f:
            f.write(buf.tobytes())
        return path
    sitk = _sitk()
    img = sitk.GetImageFromArray(labels)
    if like.has_geometry and len(like.spacing) == img.GetDimension():
        img.SetSpacing(like.spacing)
        img.SetOrigin(like.origin)
        img.SetDirection(like.direction)
    # ITK picks the writer from the file name, so it writes to a named file in a private folder;
    # the bytes then reach the target through the one atomic write (temp file beside it, rename).
    with tempfile.TemporaryDirectory(prefix="mcp-medsam-") as tmp:
        staged = Path(tmp) / f"labels{s}"
        try:
            sitk.WriteImage(img, str(staged), useCompression=s in (".nrrd", ".mha"))
        except RuntimeError as exc:
            raise InputError(f"cannot write {path.name} ({_itk_reason(exc)})") from None
        with open(staged, "rb") as src, atomic_file(path) as f:
            shutil.copyfileobj(src, f, 1 << 20)
    return path
