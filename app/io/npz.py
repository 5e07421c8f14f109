"""Reading and validating one NPZ case: every bad input gets one clear, specific message.

CVPR 2024 ("MedSAM on Laptop") layout:
- 2D cases: ``imgs`` (H, W, 3) or (H, W) and ``boxes`` (N, 4) as x_min, y_min, x_max, y_max.
- 3D cases: ``imgs`` (D, H, W) and ``boxes`` (N, 6) as x_min, y_min, z_min, x_max, y_max, z_max.
Coordinates are inclusive pixel indices. ``spacing`` is optional (inference does not use it).

CVPR 2025 (interactive 3D) layout: ``imgs`` (D, H, W), ``boxes`` a list with one dict per target
(``z_min``, ``z_max``, ``z_mid``, ``z_mid_x_min``, ``z_mid_y_min``, ``z_mid_x_max``, ``z_mid_y_max``;
None or absent for a target without a box, which then gets no segmentation: label = target index
+ 1). Such a ``boxes`` member is a pickle; it is read by an unpickler that builds nothing but numpy
arrays, dtypes and scalars, lists, dicts, numbers and strings, and refuses any other global without
running it.

Click rounds (CVPR 2025; 2D CVPR24 cases take the same keys): ``clicks`` one dict per target
(``{"fg": [[z, y, x], ...], "bg": [...]}``, array indices; ``[y, x]`` in 2D, one dict per box),
``clicks_order`` per target the kind of each round's click (``"fg"``, ``"bg"`` or None: no click
that round), ``prev_pred`` the previous round's segs. They become :attr:`Case.points` /
:attr:`Case.point_labels` (x, y(, z) per box, in the order the clicks were made) and
:attr:`Case.prev`; both pickles go through the same restricted unpickler.

The archive is read member by member through the npy headers: dtype, shape and size are checked
before anything is decompressed, the boxes before ``imgs`` is read, and an ``imgs`` larger than a
limit when decompressed is refused from its header (memory stays bounded: no full inflate).
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import InputError, TooLarge
from ..preprocess import check_image
from ..prompts import check_boxes, check_points, label_dtype

DEFAULT_MAX_IMAGE_BYTES = 2 << 30  # 2 GiB decompressed: leaves room for the model in an 8 GB container
MAX_BOXES_BYTES = 16 << 20  # a boxes member; 65535 boxes of 6 int64 are 3 MiB
CVPR25_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError,
               RuntimeError)  # RuntimeError: an encrypted member


@dataclass
class Case:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D
    boxes: np.ndarray  # (N, 4) or (N, 6) int64, clipped to the image
    is_3d: bool
    starts: np.ndarray | None = None  # (N,) int64 slice each 3D box starts on (CVPR25 z_mid); None: middle
    labels: np.ndarray | None = None  # (N,) int64 label of each box when not 1..N (CVPR25 targets without a box)
    targets: int | None = None  # labels in use (N unless ``labels`` is given)
    notes: tuple[str, ...] = ()  # one line each for the user (e.g. ignored CVPR25 members)
    layout: str = "cvpr24"
    points: np.ndarray | None = None  # (N, P, 2 or 3) int64 x, y(, z) clicks per box, oldest first; None: none
    point_labels: np.ndarray | None = None  # (N, P) int64 1 fg, 0 bg, -1 padding
    prev: np.ndarray | None = None  # the previous round's segs (the case's labels), shaped like the output

    @property
    def clicks(self) -> int:
        """Clicks given for the boxes (0 for a box round)."""
        return 0 if self.point_labels is None else int((self.point_labels >= 0).sum())

    def prev_by_box(self) -> np.ndarray | None:
        """``prev`` in box labels 1..N (:meth:`relabel` undone; labels of targets without a box -> 0)."""
        if self.prev is None or self.labels is None:
            return self.prev
        lut = np.zeros(max(int(self.prev.max(initial=0)), int(self.labels.max(initial=0))) + 1, np.int64)
        lut[self.labels] = np.arange(1, len(self.labels) + 1)
        return lut[self.prev]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image.shape[:2] if not self.is_3d else self.image.shape

    @property
    def label_dtype(self) -> type:
        return label_dtype(len(self.boxes) if self.targets is None else self.targets)

    def relabel(self, segs: np.ndarray) -> np.ndarray:
        """Labels 1..N of the segmenter (box order) -> this case's labels (``labels``; identity if None)."""
        if self.labels is None:
            return segs
        lut = np.zeros(len(self.labels) + 1, dtype=self.label_dtype)
        lut[1:] = self.labels
        return lut[segs]


# ---------------------------------------------------------------- the archive, member by member


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


class _Archive:
    """The members of an .npz archive by key (``imgs.npy`` -> ``imgs``), read through their npy headers."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key not in self.members or info.filename.endswith(".npy"):
                self.members[key] = info

    def _open(self, key: str) -> tuple[IO[bytes], _Header]:
        info = self.members[key]
        f = self.zf.open(info)
        try:
            try:
                version = np.lib.format.read_magic(f)
            except ValueError:
                raise InputError(f"{key} is not an npy array (the archive member {info.filename} holds "
                                 f"{info.file_size} bytes of something else)") from None
            try:
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
            except (ValueError, TypeError, SyntaxError) as exc:
                raise InputError(f"{key}: malformed npy header ({exc})") from None
        except BaseException:
            f.close()
            raise
        return f, _Header(tuple(int(n) for n in shape), bool(fortran), np.dtype(dtype))

    def header(self, key: str) -> _Header:
        f, h = self._open(key)
        f.close()
        return h

    def array(self, key: str, *, max_bytes: int, limit_hint: str = "", kinds: str = "biuf") -> np.ndarray:
        """A numeric member (dtype kinds ``kinds``), its size checked against ``max_bytes`` from the header
        before any data is read, then decompressed straight into the array (no second copy)."""
        f, h = self._open(key)
        with f:
            if h.dtype.hasobject:
                raise InputError(f"{key} has dtype object (a pickled array); expected numbers")
            if h.dtype.kind not in kinds:
                raise InputError(f"{key} has dtype {h.dtype}; expected numbers")
            if h.nbytes > max_bytes:
                raise TooLarge(f"{key} is {_mib(h.nbytes)} when decompressed (shape {h.shape}, {h.dtype}); "
                               f"the limit is {_mib(max_bytes)}{limit_hint}")
            arr = np.empty(math.prod(h.shape), dtype=h.dtype)
            view = memoryview(arr).cast("B")
            got = 0
            while got < h.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise InputError(f"{key}: truncated (the archive holds {got} of the {h.nbytes} bytes its "
                                     f"header declares)")
                got += n
            if f.read(1):  # at the end this also checks the member's CRC
                raise InputError(f"{key} holds more data than its npy header declares")
        return arr.reshape(h.shape[::-1]).transpose() if h.fortran else arr.reshape(h.shape)

    def pickled(self, key: str, *, max_bytes: int) -> Any:
        """An object member (a pickle) through the restricted unpickler, at most ``max_bytes`` of it."""
        f, _ = self._open(key)
        with f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(f"{key} is a pickle of more than {_mib(max_bytes)}; refused")
        try:
            return _RestrictedUnpickler(io.BytesIO(data), key).load()
        except InputError:
            raise
        except Exception as exc:  # a damaged pickle: UnpicklingError, EOFError, ValueError, TypeError, ...
            raise InputError(f"{key}: unreadable pickled data ({exc.__class__.__name__}: {exc})") from None


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The few globals numpy's pickles of object arrays and scalars name (numpy 1.x and 2.x module paths)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    safe: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        safe[(module, "_reconstruct")] = reconstruct
        safe[(module, "scalar")] = scalar
    return safe


_SAFE_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars and the plain containers pickle makes without globals
    (lists, dicts, tuples, numbers, strings); any other global is refused before it is looked up."""

    def __init__(self, file: IO[bytes], key: str = "boxes") -> None:
        super().__init__(file)
        self.key = key

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise InputError(f"{self.key} is a pickle that calls {module}.{name}; refused without running it "
                             f"(only lists of dicts of numbers are read)") from None


# ---------------------------------------------------------------- the CVPR 2025 box list


def _coordinate(value: Any, where: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{where} is {value!r}; expected a number")
    try:
        return float(value)
    except OverflowError:  # a Python int beyond float range: far outside any image
        return math.copysign(math.inf, value)


def _cvpr25_boxes(raw: Any, dims: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """CVPR25 ``boxes`` (one dict or None per target) -> (K, 6) clipped boxes, (K,) start slices,
    (K,) labels (target index + 1), the number of targets."""
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim <= 1:
        items = list(raw.reshape(-1))
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        what = f"array of shape {raw.shape}" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise InputError(f"boxes is a pickled {what}; expected an (N, 4) or (N, 6) array of numbers, or the "
                         f"CVPR 2025 list of one dict per target")
    boxes, starts, labels = [], [], []
    for i, item in enumerate(items):
        if item is None or (isinstance(item, dict) and not item):
            continue  # a target without a box: no segmentation, its label stays unused
        if not isinstance(item, dict):
            raise InputError(f"boxes entry {i + 1} is a {type(item).__name__}; the CVPR 2025 layout gives a dict "
                             f"with {', '.join(CVPR25_KEYS)}")
        missing = [k for k in CVPR25_KEYS if k not in item]
        if missing:
            raise InputError(f"boxes entry {i + 1} lacks {', '.join(missing)}")
        v = {k: _coordinate(item[k], f"boxes entry {i + 1} {k}") for k in CVPR25_KEYS}
        boxes.append([v["z_mid_x_min"], v["z_mid_y_min"], v["z_min"], v["z_mid_x_max"], v["z_mid_y_max"], v["z_max"]])
        z = v["z_mid"]
        if not (v["z_min"] <= z <= v["z_max"]) or not (0 <= z < dims[2]) or z != int(z):
            raise InputError(f"boxes entry {i + 1}: z_mid {item['z_mid']} must be a slice of the volume "
                             f"(0..{dims[2] - 1}) within z_min..z_max ({item['z_min']}..{item['z_max']})")
        starts.append(int(z))
        labels.append(i + 1)
    checked = check_boxes(np.array(boxes, dtype=np.float64).reshape(-1, 6), dims)
    return checked, np.array(starts, np.int64), np.array(labels, np.int64), len(items)


# ---------------------------------------------------------------- the click rounds


def _entries(raw: Any, key: str) -> list[Any]:
    """A member holding one entry per target (a pickled list or object array, or a plain array) -> its entries."""
    if isinstance(raw, np.ndarray) and raw.ndim >= 1:
        return list(raw)
    if isinstance(raw, (list, tuple)):
        return list(raw)
    raise InputError(f"{key} is a {type(raw).__name__}; expected a list with one entry per target")


def _member(npz: _Archive, key: str, kinds: str) -> Any:
    """A small member: a pickle through the restricted unpickler, or a plain array of dtype kinds ``kinds``."""
    if npz.header(key).dtype.hasobject:
        return npz.pickled(key, max_bytes=MAX_BOXES_BYTES)
    return npz.array(key, max_bytes=MAX_BOXES_BYTES, kinds=kinds)


def _click_list(value: Any, where: str, k: int) -> list[list[float]]:
    """A list of clicks (each k array indices) -> floats, each value checked to be a number."""
    if isinstance(value, np.ndarray):
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where} is a {type(value).__name__}; expected a list of clicks")
    out = []
    for j, c in enumerate(value):
        if isinstance(c, np.ndarray):
            c = list(c.reshape(-1)) if c.ndim == 1 else c
        if not isinstance(c, (list, tuple)) or len(c) != k:
            raise InputError(f"{where} click {j + 1} is {c!r}; expected {k} array indices "
                             f"({'[z, y, x]' if k == 3 else '[y, x]'})")
        out.append([_coordinate(v, f"{where} click {j + 1}") for v in c])
    return out


def _clicks(npz: _Archive, targets: int, box_of_target: dict[int, int], dims: tuple[int, ...]
            ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The ``clicks`` (+ ``clicks_order``) members -> :func:`click_prompts`."""
    items = _entries(_member(npz, "clicks", ""), "clicks")
    order = _entries(_member(npz, "clicks_order", "U"), "clicks_order") if "clicks_order" in npz.members else None
    return click_prompts(items, order, targets, box_of_target, dims)


def click_prompts(items: list[Any], order: list[Any] | None, targets: int, box_of_target: dict[int, int],
                  dims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CVPR 2025 ``clicks`` (one ``{"fg": [...], "bg": [...]}`` per target, array indices) and
    ``clicks_order`` (per target ``"fg"``/``"bg"``/None per round; None: fg before bg) -> (N, P, k)
    int64 x, y(, z) per box, (N, P) int64 labels (1 fg, 0 bg, -1 padding), oldest click first, and
    notes. dims: (W, H[, D]), k = len(dims); box_of_target: target index -> box row (targets without
    a box are left out). Every value is checked; InputError names the entry at fault."""
    k = len(dims)
    if len(items) != targets:
        raise InputError(f"clicks has {len(items)} entries for {targets} target(s); expected one dict per target")
    if order is not None and len(order) != targets:
        raise InputError(f"clicks_order has {len(order)} entries for {targets} target(s)")
    per_box: list[tuple[list[list[float]], list[int]]] = [([], []) for _ in box_of_target]
    lost, notes = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not set(item) <= {"fg", "bg"}:
            keys = f" with keys {', '.join(map(str, item))}" if isinstance(item, dict) else ""
            raise InputError(f"clicks entry {i + 1} is a {type(item).__name__}{keys}; expected a dict of fg and bg "
                             f"lists")
        fg = _click_list(item.get("fg", []), f"clicks entry {i + 1} fg", k)
        bg = _click_list(item.get("bg", []), f"clicks entry {i + 1} bg", k)
        if order is None:
            kinds = ["fg"] * len(fg) + ["bg"] * len(bg)
        else:
            kinds = [v for v in _entries(order[i], f"clicks_order entry {i + 1}") if v is not None and v != "None"]
            if kinds.count("fg") != len(fg) or kinds.count("bg") != len(bg) or len(kinds) != len(fg) + len(bg):
                shown = [str(v) for v in kinds][:12]
                raise InputError(f"clicks_order entry {i + 1} ({', '.join(shown)}) does not match its clicks "
                                 f"({len(fg)} fg, {len(bg)} bg)")
        if i not in box_of_target:
            if kinds:
                lost.append(str(i + 1))
            continue
        pts, labels = per_box[box_of_target[i]]
        queues = {"fg": iter(fg), "bg": iter(bg)}
        for kind in kinds:
            pts.append(next(queues[kind])[::-1])  # array indices (z, y, x) -> x, y, z as the boxes
            labels.append(1 if kind == "fg" else 0)
    if order is None and any(lab for _, lab in per_box):
        notes.append("no clicks_order: each target's foreground clicks taken as older than its background clicks")
    if lost:
        notes.append(f"clicks of target(s) {', '.join(lost)} ignored: they have no box, and the model needs one")
    width = max([len(lab) for _, lab in per_box] + [1])
    raw = np.zeros((len(per_box), width, k), np.float64)
    kinds_arr = np.full((len(per_box), width), -1, np.int64)
    for i, (p, lab) in enumerate(per_box):
        raw[i, : len(p)] = np.array(p, np.float64).reshape(-1, k)
        kinds_arr[i, : len(lab)] = lab
    try:
        pts, labels = check_points(raw, kinds_arr, len(per_box), dims)
    except InputError as exc:
        raise InputError(f"clicks: {exc}") from None
    return pts, labels, tuple(notes)


def _prev(npz: _Archive, shape: tuple[int, ...], max_bytes: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """``prev_pred`` when it is integer labels shaped like the output, else None and a note."""
    h = npz.header("prev_pred")
    if h.dtype.hasobject or h.dtype.kind not in "biu" or h.shape != tuple(shape):
        return None, (f"prev_pred ({h.shape}, {h.dtype}) ignored: expected integer labels of shape {tuple(shape)}",)
    return npz.array("prev_pred", max_bytes=max_bytes), ()


# ---------------------------------------------------------------- the case


def _box_width(shape: tuple[int, ...], img_shape: tuple[int, ...]) -> int:
    if len(shape) == 2 and shape[1] in (4, 6):
        return shape[1]
    if len(shape) == 1 and math.prod(shape) in (4, 6):
        return shape[0]
    if math.prod(shape) == 0:  # no boxes: the image decides (an (H, W, 3) image is 2D)
        return 6 if len(img_shape) == 3 and img_shape[-1] != 3 else 4
    raise InputError(f"boxes has shape {shape}; expected (N, 4) for 2D or (N, 6) for 3D")


def load_case(path: str | Path, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Case:
    """One case file (CVPR24 or CVPR25 layout) read and checked; InputError with a message otherwise.

    max_image_bytes: the most ``imgs`` may take decompressed (default 2 GiB), checked from its header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})") from None
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise InputError("not a readable .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_case(path.name, _Archive(zf), max_image_bytes)
    except InputError:
        raise
    except _ZIP_ERRORS as exc:
        raise InputError(f"not a readable .npz file ({exc.__class__.__name__}: {exc})") from None


def segs_layout(path: str | Path) -> tuple[tuple[int, ...], np.dtype | None]:
    """The shape ((H, W) or (D, H, W)) and dtype of the ``segs`` a case gives, from its npy headers alone
    (nothing is decompressed); dtype None for the CVPR 2025 layout (it would need the pickled boxes).
    For the resume check of a finished output; InputError when the case cannot be read this far."""
    try:
        with zipfile.ZipFile(path) as zf:
            npz = _Archive(zf)
            if "imgs" not in npz.members or "boxes" not in npz.members:
                raise InputError("missing key(s) imgs or boxes")
            shape, boxes = npz.header("imgs").shape, npz.header("boxes")
    except InputError:
        raise
    except _ZIP_ERRORS as exc:
        raise InputError(f"not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    if boxes.dtype.hasobject:
        return tuple(shape), None
    width = _box_width(boxes.shape, shape)
    n = boxes.shape[0] if len(boxes.shape) == 2 else 1
    return (tuple(shape) if width == 6 else tuple(shape[:2])), np.dtype(label_dtype(n))


def _read_case(name: str, npz: _Archive, max_image_bytes: int) -> Case:
    keys = set(npz.members)
    missing = [k for k in ("imgs", "boxes") if k not in keys]
    if "boxes" in missing and "clicks" in keys and "imgs" in keys:
        raise InputError("no boxes: this case gives only clicks, and the model needs a box per target (its clicks "
                         "refine the box's mask)")
    if missing:
        raise InputError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'none'})")
    img_h = npz.header("imgs")
    shape = img_h.shape
    if img_h.dtype.hasobject:
        raise InputError("imgs has dtype object (a pickled array); expected uint8")
    box_h = npz.header("boxes")
    prefix = name.split("_")[0]
    notes: tuple[str, ...] = ()
    starts = labels = None
    targets = None
    if box_h.dtype.hasobject:  # the CVPR 2025 layout: a pickled list of dicts
        if len(shape) != 3:
            raise InputError(f"imgs has shape {shape}; CVPR 2025 cases (boxes as dicts) need a (D, H, W) volume")
        if prefix == "2DBox":
            raise InputError("CVPR 2025 boxes (dicts with z ranges) in a 2DBox_ case")
        boxes, starts, labels, targets = _cvpr25_boxes(npz.pickled("boxes", max_bytes=MAX_BOXES_BYTES),
                                                       (shape[2], shape[1], shape[0]))
        is_3d, layout = True, "cvpr25"
    else:
        raw = npz.array("boxes", max_bytes=MAX_BOXES_BYTES)
        width = _box_width(raw.shape, shape)
        is_3d, layout = width == 6, "cvpr24"
        if prefix in ("2DBox", "3DBox") and (prefix == "3DBox") != is_3d:
            raise InputError(f"boxes of {width} coordinates in a {prefix}_ case "
                             f"(2D boxes are x_min, y_min, x_max, y_max; 3D add z_min and z_max)")
        if is_3d and len(shape) != 3:
            raise InputError(f"imgs has shape {shape}; a 3D case (boxes of 6) needs (D, H, W)")
        if not is_3d and not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))):
            raise InputError(f"imgs has shape {shape}; a 2D case (boxes of 4) needs (H, W, 3) or (H, W)")
        dims = (shape[2], shape[1], shape[0]) if is_3d else (shape[1], shape[0])
        boxes = check_boxes(raw, dims)  # before a single byte of imgs is decompressed
    points = point_labels = prev = None
    if "clicks" in keys:  # read and checked before imgs too
        dims = (shape[2], shape[1], shape[0]) if is_3d else (shape[1], shape[0])
        targets_given = len(boxes) if targets is None else targets
        rows = {int(t) - 1: j for j, t in enumerate(labels)} if labels is not None else \
            {i: i for i in range(len(boxes))}
        points, point_labels, more = _clicks(npz, targets_given, rows, dims)
        notes += more
    imgs = npz.array("imgs", max_bytes=max_image_bytes,
                     limit_hint=" (raise it with --max-image-mb, or max_image_bytes in load_case)")
    image = check_image(imgs, volume=is_3d, name="imgs")
    if point_labels is not None and (point_labels >= 0).any() and is_3d and "prev_pred" in keys:
        prev, more = _prev(npz, image.shape, max_image_bytes)
        notes += more
    return Case(name=name, image=image, boxes=boxes, is_3d=is_3d, starts=starts, labels=labels, targets=targets,
                notes=notes, layout=layout, points=points, point_labels=point_labels, prev=prev)
