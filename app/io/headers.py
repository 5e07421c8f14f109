"""What a file's header declares, read by this module before any decoder sees the file.

Three checks every reader of :mod:`mcp_medsam.io.medical` makes first (each problem one InputError):

- detached data: NRRD (``data file:``/``datafile:``, its LIST/SKIPLIST and pattern forms),
  MetaImage (``ElementDataFile`` other than ``LOCAL``) and NIfTI pairs (magic ``ni1``/``ni2``: the
  voxels in a ``.img``) let a header name another file, which SimpleITK would open: such a file is
  refused from its header text, so a header never makes a reader open another path;
- size: the pixels a picture's header declares (PNG IHDR, JPEG SOF, BMP and TIFF headers) against
  the caller's limit, before decoding (:func:`check_size`, the one limit check; volumes and DICOM
  are checked the same way from SimpleITK's header information, which reads no pixels);
- NIfTI length and values: a ``.nii``/``.nii.gz`` shorter than its header declares (ITK would fill
  the rest with zeros), and NaN/infinite float voxels (ITK's NIfTI reader turns NaN into 0), found in
  one streamed pass over the raw voxel bytes (constant memory).
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, TooLarge

HEADER_LIMIT = 1 << 20  # a text header (NRRD, MetaImage) longer than this is refused, not searched
_CHUNK = 1 << 22


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def check_size(nbytes: int, max_bytes: int | None, what: str) -> None:
    """TooLarge when an image whose header declares ``nbytes`` decoded bytes exceeds ``max_bytes``
    (None: no limit). what: the image as the message names it (``a 16000x16000 picture``)."""
    if max_bytes is not None and nbytes > max_bytes:
        raise TooLarge(f"{what} would take {_mib(nbytes)} decoded; the limit is {_mib(max_bytes)} "
                       f"(--max-image-mb)")


@dataclass(frozen=True)
class Declared:
    """A picture's grid as its header declares it: width, height, values per pixel (as OpenCV's
    IMREAD_UNCHANGED decodes them) and bytes per value."""

    width: int
    height: int
    channels: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.channels * self.itemsize

    def describe(self, kind: str) -> str:
        return f"a {self.width}x{self.height} {kind} of {self.channels} x {8 * self.itemsize}-bit values"


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


# ---------------------------------------------------------------- pictures


def _png(path: Path) -> Declared:
    head = _head(path, 33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise InputError("not a readable PNG file (no PNG header)")
    w, h, depth, colour = struct.unpack(">IIBB", head[16:26])
    # Palette images decode to 3 channels; grey+alpha to 2 (OpenCV: 4); RGBA to 4.
    channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}.get(colour)
    if channels is None or depth not in (1, 2, 4, 8, 16) or not w or not h:
        raise InputError(f"not a readable PNG file (IHDR: {w}x{h}, bit depth {depth}, colour type {colour})")
    return Declared(w, h, channels, 2 if depth == 16 else 1)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(path: Path) -> Declared:
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            raise InputError("not a readable JPEG file (no JPEG header)")
        while True:
            b = f.read(1)
            while b == b"\xff":  # fill bytes before a marker
                b = f.read(1)
            if not b:
                break
            marker = b[0]
            if marker in (0x01, *range(0xD0, 0xD8)):  # no length field
                continue
            raw = f.read(2)
            if len(raw) < 2:
                break
            (length,) = struct.unpack(">H", raw)
            if marker in _SOF:
                seg = f.read(6)
                if len(seg) < 6:
                    break
                precision, h, w, comps = struct.unpack(">BHHB", seg)
                if not w or not h:
                    raise InputError(f"a JPEG whose header declares {w}x{h} pixels; refused")
                return Declared(w, h, 1 if comps == 1 else 3, 2 if precision > 8 else 1)
            if marker == 0xD9 or length < 2:
                break
            f.seek(length - 2, 1)
    raise InputError("not a readable JPEG file (no frame header)")


def _bmp(path: Path) -> Declared:
    head = _head(path, 30)
    if len(head) < 26 or head[:2] != b"BM":
        raise InputError("not a readable BMP file (no BMP header)")
    (dib,) = struct.unpack("<I", head[14:18])
    if dib == 12:
        w, h, _, bpp = struct.unpack("<HHHH", head[18:26])
    elif len(head) >= 30:
        w, h, _, bpp = struct.unpack("<iiHH", head[18:30])
    else:
        raise InputError("not a readable BMP file (short header)")
    w, h = abs(w), abs(h)
    if not w or not h:
        raise InputError(f"a BMP whose header declares {w}x{h} pixels; refused")
    return Declared(w, h, 4 if bpp == 32 else 3, 1)


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8


def _tiff(path: Path) -> Declared:
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            raise InputError("not a readable TIFF file (no TIFF header)")
        e = "<" if head[:2] == b"II" else ">"
        (magic,) = struct.unpack(e + "H", head[2:4])
        if magic == 42:
            (ifd,) = struct.unpack(e + "I", head[4:8])
            count_fmt, entry_size, value_size = "H", 12, 4
        elif magic == 43 and len(head) == 16:  # BigTIFF
            (ifd,) = struct.unpack(e + "Q", head[8:16])
            count_fmt, entry_size, value_size = "Q", 20, 8
        else:
            raise InputError("not a readable TIFF file (bad TIFF header)")
        f.seek(ifd)
        raw = f.read(struct.calcsize(count_fmt))
        if len(raw) < struct.calcsize(count_fmt):
            raise InputError("not a readable TIFF file (no image directory)")
        (n,) = struct.unpack(e + count_fmt, raw)
        entries = f.read(min(n, 4096) * entry_size)
        tags: dict[int, int] = {}
        for i in range(len(entries) // entry_size):
            entry = entries[i * entry_size:(i + 1) * entry_size]
            tag, typ = struct.unpack(e + "HH", entry[:4])
            if tag not in (256, 257, 258, 277) or typ not in _TIFF_TYPES:
                continue
            code, size = _TIFF_TYPES[typ]
            count = struct.unpack(e + ("I" if value_size == 4 else "Q"), entry[4:4 + value_size])[0]
            field = entry[4 + value_size:]
            if count * size > value_size:  # the values lie elsewhere (BitsPerSample per channel): read the first
                (offset,) = struct.unpack(e + ("I" if value_size == 4 else "Q"), field)
                pos = f.tell()
                f.seek(offset)
                field = f.read(size)
                f.seek(pos)
            if len(field) >= size:
                tags[tag] = struct.unpack(e + code, field[:size])[0]
    w, h = tags.get(256, 0), tags.get(257, 0)
    if not w or not h:
        raise InputError(f"not a readable TIFF file (its header declares {w}x{h} pixels)")
    bits = tags.get(258, 1)
    return Declared(w, h, max(tags.get(277, 1), 1), max(math.ceil(bits / 8), 1))


_PICTURES = {"png": (_png, "picture"), "jpeg": (_jpeg, "picture"), "bmp": (_bmp, "picture"), "tiff": (_tiff, "picture")}


def check_picture(path: Path, fmt: str, max_bytes: int | None) -> Declared:
    """The grid a picture's header declares (``fmt``: png, jpeg, bmp or tiff), checked against ``max_bytes``
    before anything decodes it; InputError for a header that declares no grid, TooLarge above the limit."""
    parse, kind = _PICTURES[fmt]
    try:
        declared = parse(path)
    except (OSError, struct.error) as exc:
        raise InputError(f"not a readable {fmt.upper()} file ({getattr(exc, 'strerror', None) or exc})") from None
    check_size(declared.nbytes, max_bytes, declared.describe(kind))
    return declared


# ---------------------------------------------------------------- detached data


def _text_header(path: Path) -> list[str]:
    """The lines of a text header up to its first empty line (or the file's end), at most HEADER_LIMIT bytes."""
    with open(path, "rb") as f:
        data = f.read(HEADER_LIMIT + 1)
    end = re.search(rb"\r?\n\r?\n", data)
    if end is None and len(data) > HEADER_LIMIT:
        raise InputError(f"a header longer than {HEADER_LIMIT // 1024} KiB; refused")
    text = data[: end.start() if end else len(data)]
    return text.decode("latin-1").split("\n")


def _key(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def _detached(name: str, where: str) -> InputError:
    return InputError(f"its header names another file for its data ({where}); detached data is refused "
                      f"(a header must not make this reader open another path): save the image as one "
                      f"{name} file with its data inside")


def check_nrrd(path: Path) -> None:
    """InputError when an NRRD header has a ``data file`` field (any form: a file name, LIST,
    SKIPLIST or a pattern); its field names are matched as NrrdIO matches them, and more loosely
    (case and spaces ignored), so nothing it would follow passes."""
    lines = _text_header(path)
    if not lines or not lines[0].startswith("NRRD"):
        raise InputError("not a readable nrrd file (no NRRD magic)")
    for line in lines[1:]:
        line = line.rstrip("\r")
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)  # a "data file:=..." key/value line is refused too: no doubt left
        if _key(key) == "datafile":
            raise _detached(".nrrd", f"data file: {value.strip()[:80]}")


def check_metaimage(path: Path) -> None:
    """InputError when a MetaImage header's ``ElementDataFile`` is anything but LOCAL (a file name,
    LIST, a pattern). The first line whose key is ElementDataFile in any case ends the header, as it
    ends MetaIO's; a spelling MetaIO would not take is refused rather than read past."""
    with open(path, "rb") as f:
        data = f.read(HEADER_LIMIT)
    for raw in data.split(b"\n"):
        line = raw.decode("latin-1").rstrip("\r")
        if "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if _key(key) == "elementdatafile":
            if key == "ElementDataFile" and value.lower() == "local":
                return
            raise _detached(".mha", f"{key} = {value[:80]}")
    raise InputError("not a readable metaimage file (no ElementDataFile = LOCAL in its first "
                     f"{HEADER_LIMIT // 1024} KiB)")


# ---------------------------------------------------------------- NIfTI


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1/2 header that decide where the voxels lie and how many bytes they take."""

    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int
    slope: float
    inter: float

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * self.bitpix // 8


# NIfTI datatype codes of float voxels, as numpy reads them (complex types are refused later, float128 here).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_NIFTI_KNOWN = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
                1792: 128, 2304: 32}


def _nifti_stream(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def nifti_header(path: Path) -> NiftiHeader:
    """The header of a one-file NIfTI-1 or NIfTI-2 (``.nii``, ``.nii.gz``); InputError for a pair header
    (magic ``ni1``/``ni2``: the voxels would be read from a ``.img`` beside it), an Analyze file, or a
    malformed header."""
    try:
        with _nifti_stream(path) as f:
            head = f.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"not a readable nifti file ({getattr(exc, 'strerror', None) or exc})") from None
    for e in "<>":
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            magic = head[344:348]
            dim = struct.unpack(e + "8h", head[40:56])
            datatype, bitpix = struct.unpack(e + "hh", head[70:74])
            vox_offset, slope, inter = struct.unpack(e + "fff", head[108:120])
            single, pair = b"n+1\0", b"ni1\0"
            break
        if len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            magic = head[4:8]
            datatype, bitpix = struct.unpack(e + "hh", head[12:16])
            dim = struct.unpack(e + "8q", head[16:80])
            vox_offset, slope, inter = struct.unpack(e + "qdd", head[168:192])
            single, pair = b"n+2\0", b"ni2\0"
            break
    else:
        raise InputError("not a readable nifti file (no NIfTI-1 or NIfTI-2 header)")
    if magic == pair:
        raise _detached(".nii", "a NIfTI pair header: its voxels lie in a .img file")
    if magic != single:
        raise InputError("not a one-file NIfTI (no n+1/n+2 magic: an Analyze header?); save it as .nii or .nii.gz")
    n = dim[0]
    if not 1 <= n <= 7 or any(d < 1 for d in dim[1:n + 1]):
        raise InputError(f"not a readable nifti file (its header declares dimensions {list(dim[:n + 1])})")
    if datatype not in _NIFTI_KNOWN or bitpix != _NIFTI_KNOWN[datatype]:
        raise InputError(f"not a readable nifti file (datatype {datatype}, {bitpix} bits per voxel)")
    if not math.isfinite(vox_offset) or vox_offset < 0:
        raise InputError(f"not a readable nifti file (voxel offset {vox_offset})")
    if slope != 0 and not (math.isfinite(slope) and math.isfinite(inter)):
        raise InputError(f"a scaling of {slope} x + {inter} in the header: NaN or infinite values")
    return NiftiHeader(dims=tuple(int(d) for d in dim[1:n + 1]), datatype=datatype, bitpix=bitpix,
                       vox_offset=int(vox_offset), slope=float(slope), inter=float(inter))


def check_nifti_data(path: Path, header: NiftiHeader) -> None:
    """One streamed pass over the voxel bytes: InputError when the file holds fewer than its header
    declares, or (float voxels) any NaN or infinite value. Memory: one chunk."""
    need = header.nbytes
    dtype = _NIFTI_FLOATS.get(header.datatype)
    item = header.bitpix // 8
    chunk = _CHUNK - _CHUNK % max(item, 1)
    got = 0
    bad = 0
    try:
        with _nifti_stream(path) as f:
            skip = header.vox_offset
            while skip:
                n = len(f.read(min(skip, _CHUNK)))
                if not n:
                    break
                skip -= n
            while got < need and not skip:
                data = f.read(min(chunk, need - got))
                if not data:
                    break
                got += len(data)
                if dtype is not None:
                    a = np.frombuffer(data[: len(data) - len(data) % item], dtype=np.dtype(dtype))
                    bad += int(a.size - np.count_nonzero(np.isfinite(a)))
    except (OSError, EOFError, zlib.error) as exc:
        why = "the compressed data ends early" if isinstance(exc, EOFError) else (getattr(exc, "strerror", None) or exc)
        raise InputError(f"{path.name} is truncated or damaged ({why}); its header declares "
                         f"{need} bytes of voxels") from None
    if got < need:
        raise InputError(f"{path.name} is truncated: it holds {got} of the {need} bytes of voxels its "
                         f"header declares")
    if bad:
        raise InputError(f"{bad} NaN or infinite voxel value(s); expected finite numbers")
