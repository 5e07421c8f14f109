"""Uploads: a multipart body streamed into the image's private folder, then read into an array.

No client ever names a server-side path: the file is written as ``upload<suffix>`` in a folder the
store made, the suffix taken from a fixed list of formats; the client's file name is read only for
that suffix, a download name and a CVPR24 modality token (``2DBox_XRay_...``).

Arrays come out as the model takes them: (H, W, 3) uint8 RGB for a 2D image, (D, H, W) uint8 for
a volume (z, y, x; a single ``.dcm`` file is a volume one slice deep), with the spacing in mm in the
same order, the array's, where the file has one: the order of NPZ ``spacing`` and of
``MedicalImage.spacing_zyx`` (``MedicalImage.spacing`` is SimpleITK's, x first).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, SegmentationError, TooLarge, UnknownModality
from ..modality import accepted_token, modality_token
from ..preprocess import check_image

UPLOAD_STEM = "upload"
DICOM_ZIP = ".zip"  # a DICOM series, zipped
# Header + data pairs: one upload cannot carry both files (.mha and .nrrd are the same formats in one file).
PAIRED = (".mhd", ".nhdr")
MAX_ZIP_MEMBERS = 10000
# A DICOM .zip unpacks to at most this many times --max-image-mb: 16-bit pixels of the largest image taken.
ZIP_FACTOR = 2
# The file's own values may take this many times --max-image-mb while they are read (float32 voxels of the
# largest image taken; the readers check it from the headers, before decoding: mcp_medsam.io.headers).
NATIVE_FACTOR = 4
# How a picture uploaded without a modality is converted: as any modality but grey microscopy.
PICTURE_MODALITY = "XRay"
FORM_FIELDS = ("file", "modality", "window", "series")
MAX_FIELD_BYTES = 256


class UploadError(InputError):
    """A malformed or unreadable upload (HTTP status ``status``)."""

    status = 422


class UploadTooLarge(UploadError, TooLarge):
    status = 413


class UnsupportedFormat(UploadError):
    status = 415


def suffixes() -> tuple[str, ...]:
    """File suffixes an upload may have, longest first (``.nii.gz`` before ``.nii``): the one-file formats
    of :mod:`mcp_medsam.io.medical`, and ``.zip`` for a DICOM series."""
    from ..io.medical import SUFFIXES

    return tuple(sorted({*SUFFIXES, DICOM_ZIP} - set(PAIRED), key=len, reverse=True))


def upload_suffix(filename: str) -> str:
    """The accepted suffix of a client's file name, lower case; raises UnsupportedFormat."""
    low = filename.lower()
    for suffix in suffixes():
        if low.endswith(suffix):
            return suffix
    if low.endswith(PAIRED):
        raise UnsupportedFormat(f"cannot upload {filename!r}: a header whose data lies in another file; "
                                f"send it as one file (.mha or .nrrd)")
    raise UnsupportedFormat(f"cannot read {filename!r}: the file name must end in one of "
                            f"{', '.join(sorted(suffixes()))}")


def download_stem(filename: str) -> str:
    """A safe base name for result downloads, from the client's file name (``CHNCXR-0001-0_image``)."""
    base = re.split(r"[\\/]", filename)[-1]
    low = base.lower()
    for suffix in suffixes():
        if low.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:100] or "image"


def parse_window(text: str | None) -> tuple[float, float] | None:
    """The form field ``window`` (``"40,400"``: LEVEL,WIDTH) -> (40.0, 400.0), None for none; checked
    by the command line's own rule (:func:`mcp_medsam.segment.parse_window`: finite numbers, width > 0)."""
    if not text:
        return None
    from ..segment import parse_window as command_line_rule

    try:
        return command_line_rule(text)
    except InputError as exc:
        raise UploadError(str(exc).replace("--window", "the form field 'window'")) from None


def modality_from_name(filename: str) -> str | None:
    """The modality token of a CVPR24 case name (``2DBox_XRay_...`` -> ``XRay``); None for other names."""
    base = re.split(r"[\\/]", filename)[-1]
    if base.split("_")[0] not in ("2DBox", "3DBox"):
        return None
    try:
        return accepted_token(modality_token(base))
    except UnknownModality:
        return None


# ---------------------------------------------------------------- the multipart body


@dataclass
class Received:
    """What a multipart upload carried: the file written to ``path`` and the text fields."""

    path: Path
    filename: str
    fields: dict[str, str]


class MultipartSink:
    """Callbacks of python-multipart's streaming parser: the ``file`` part goes straight to disk.

    Only the form fields of :data:`FORM_FIELDS` are accepted, each at most once; text fields are
    capped at :data:`MAX_FIELD_BYTES`. The total body size is capped before this (the app's body
    limit), so nothing here holds more than one chunk of the file in memory.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fields: dict[str, str] = {}
        self.path: Path | None = None
        self.filename = ""
        self._headers: dict[bytes, bytes] = {}
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._name = ""
        self._out: Any = None
        self._text: bytearray | None = None

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._hname).lower()] = bytes(self._hvalue)
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise UploadError(f"unknown form field {name!r}; this endpoint takes: {', '.join(FORM_FIELDS)}")
        if name in self.fields or (name == "file" and self.path is not None):
            raise UploadError(f"form field {name!r} given more than once")
        self._name = name
        if name == "file":
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            if not filename:
                raise UploadError("the 'file' part has no file name (send it as a file, e.g. curl -F file=@image.png)")
            self.filename = filename
            self.path = self.folder / f"{UPLOAD_STEM}{upload_suffix(filename)}"
            self._out = open(self.path, "wb")
        else:
            self._text = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise UploadError(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._out is not None:
            self.close()
        elif self._text is not None:
            try:
                self.fields[self._name] = self._text.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UploadError(f"form field {self._name!r} is not UTF-8 text") from None
            self._text = None


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; raises UploadError for anything else."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadError(f"expected a multipart/form-data body with a 'file' part (got Content-Type "
                          f"{content_type or 'none'!r}), e.g. curl -F file=@image.png")
    return options[b"boundary"]


async def receive_upload(chunks: Any, content_type: str | None, folder: Path) -> Received:
    """Stream a multipart body (an async iterator of bytes) into ``folder``; the ``file`` part is required."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError

    sink = MultipartSink(folder)
    parser = MultipartParser(multipart_boundary(content_type), sink.callbacks())
    try:
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(f"malformed multipart body ({exc})") from None
    finally:
        sink.close()
    if sink.path is None:
        raise UploadError("no 'file' part in the form (send the image as a file field named 'file')")
    return Received(path=sink.path, filename=sink.filename, fields=sink.fields)


# ---------------------------------------------------------------- files to arrays


@dataclass
class Loaded:
    """An uploaded file as the model takes it: (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D.

    spacing: mm per pixel in array order ((z, y, x) for 3D, (y, x) for 2D), None where the file
    has none; native: the file's geometry (a :class:`~mcp_medsam.io.medical.MedicalImage` holding
    no pixels), to write results back on its grid; boxes: an NPZ case's own boxes (else None).
    """

    array: np.ndarray
    is_3d: bool
    spacing: tuple[float, ...] | None
    native: Any = None
    boxes: np.ndarray | None = None


def _too_large(nbytes: int, max_bytes: int, what: str) -> UploadTooLarge:
    return UploadTooLarge(f"{what} would take {nbytes / 2**20:.0f} MB as uint8; this server takes at most "
                          f"{max_bytes / 2**20:.0f} MB per image (--max-image-mb)")


def read_upload(path: Path, *, filename: str, modality: str | None, window: tuple[float, float] | None = None,
                series: str | None = None, max_bytes: int) -> Loaded:
    """:func:`load_upload`, with every server-side path in its messages replaced by the client's file name."""
    try:
        return load_upload(path, modality=modality, window=window, series=series, max_bytes=max_bytes)
    except InputError as exc:
        text = (str(exc).replace(str(path), filename).replace(str(path.parent), "")
                .replace("--series UID", "the form field 'series'").replace("--window", "the form field 'window'"))
        raise type(exc)(text) from None


def load_upload(path: Path, *, modality: str | None, window: tuple[float, float] | None = None,
                series: str | None = None, max_bytes: int) -> Loaded:
    """Read an uploaded file by its suffix (:mod:`mcp_medsam.io.medical` does the formats) and convert
    its intensities to uint8 as the challenge did (:func:`~mcp_medsam.io.medical.to_uint8`).

    modality decides that conversion for native volumes (CT: window L40/W400 HU; others: 0.5..99.5
    percentiles of the voxels above zero), so a volume needs one (or a ``window``); a picture without
    one is converted as any non-microscopy picture (8-bit as is, 16-bit and float by percentiles).
    Raises UploadError (413/415/422) or InputError with a message for the user.
    """
    from ..io import medical

    suffix = upload_suffix(path.name)
    if suffix == medical.NPZ_SUFFIX:
        return _read_npz(path, max_bytes=max_bytes)
    if suffix == DICOM_ZIP:
        folder = _unzip_series(path, max_bytes=ZIP_FACTOR * max_bytes)
        image = _read_native(lambda: medical.read_image(folder, series=series, max_bytes=NATIVE_FACTOR * max_bytes))
    else:
        if series is not None:
            raise UploadError("'series' applies to a .zip of a DICOM series")
        image = _read_native(lambda: medical.read_image(path, max_bytes=NATIVE_FACTOR * max_bytes))
    voxels = int(np.prod(image.shape, dtype=np.int64)) * (1 if image.is_3d else 3)
    if voxels > max_bytes:
        raise _too_large(voxels, max_bytes, f"an image of {'x'.join(map(str, image.shape))}")
    if image.is_3d and modality is None and window is None:
        raise UploadError("a volume's intensities are converted by its modality (CT: window L40/W400 HU; "
                          "MR, PET, ...: percentiles): send 'modality' (or 'window' LEVEL,WIDTH) with the upload")
    array = medical.to_uint8(image, modality or PICTURE_MODALITY, window=window)
    # A volume stays a volume, one slice deep too (a single .dcm file), as `segment` reads it.
    # The geometry without the pixels: write_labels needs only the grid's shape and the file's geometry.
    native = replace(image, array=np.broadcast_to(np.uint8(0), image.array.shape[:3] if image.is_3d
                                                  else image.array.shape[:2]))
    return Loaded(array=check_image(array, volume=image.is_3d), is_3d=image.is_3d, spacing=image.spacing_zyx,
                  native=native)


def _read_native(read: Any) -> Any:
    try:
        return read()
    except InputError:
        raise
    except SegmentationError as exc:  # SimpleITK (the io extra) missing: the server cannot read this format
        raise UnsupportedFormat(str(exc)) from None


def _read_npz(path: Path, *, max_bytes: int) -> Loaded:
    """A CVPR24/25 case (``imgs`` and ``boxes``; ``spacing`` optional), read by :func:`~mcp_medsam.io.npz.load_case`
    (sizes checked from the npy headers before anything is decompressed)."""
    from ..io.medical import MedicalImage
    from ..io.npz import load_case

    case = load_case(path, max_image_bytes=max_bytes)
    spacing = None
    with np.load(path, allow_pickle=False) as data:
        if "spacing" in data.files and data.zip.getinfo("spacing.npy").file_size < 1024:
            sp = np.asarray(data["spacing"], np.float64).ravel()
            if sp.size == (3 if case.is_3d else 2) and np.isfinite(sp).all() and (sp > 0).all():
                spacing = tuple(float(v) for v in sp)
    native = MedicalImage(array=np.broadcast_to(np.uint8(0), case.shape), is_3d=case.is_3d, source=path,
                          format="npz")
    return Loaded(array=case.image, is_3d=case.is_3d, spacing=spacing, native=native, boxes=case.boxes)


def _unzip_series(path: Path, *, max_bytes: int) -> Path:
    """Extract a .zip of DICOM files into ``<upload folder>/series/`` under names of our own (member
    names never become paths), at most MAX_ZIP_MEMBERS files and ``max_bytes`` uncompressed, counted
    as written (a member's declared size is not trusted)."""
    folder = path.parent / "series"
    folder.mkdir()
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise UploadTooLarge(f"a .zip of {len(members)} files; at most {MAX_ZIP_MEMBERS}")
            for i, member in enumerate(members):
                with zf.open(member) as src, open(folder / f"{i:06d}.dcm", "wb") as dst:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise _too_large(total, max_bytes, "the .zip's files")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as exc:
        raise UploadError(f"not a readable .zip file ({exc})") from None
    if not total:
        raise UploadError("the .zip holds no files")
    return folder
