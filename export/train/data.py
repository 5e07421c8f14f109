"""CVPR24 training cases: discovery, an on-disk index, reading slices, the split by case.

Torch-free (numpy only), so that index building and inspection never import torch.

Two folder layouts are accepted, mixed freely across the folders given:

- training layout: one ``.npz`` per case holding both ``imgs`` and ``gts`` (searched recursively,
  as the CVPR24 training set is organised in sub-folders per modality and data set);
- validation layout: ``imgs/`` and ``gts/`` sub-folders whose ``.npz`` files share their names.

Arrays: 2D images (H, W, 3) or (H, W) uint8 with gts (H, W); 3D images (D, H, W) uint8 with gts
(D, H, W); labels 1..N, 0 = background. The modality is read from the file name
(:func:`mcp_medsam.modality.modality_token`); an unknown token is an error naming the file.

The index (cases, the slices that have labels, the labels of each slice) is built once and cached
as JSON next to the run's output; an entry is reused while its files keep their size and mtime,
so a restart does not reread every volume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mcp_medsam.io.atomic import atomic_file
from mcp_medsam.modality import CATEGORIES, UnknownModality, category_index, modality_token

INDEX_VERSION = 1


class DataError(ValueError):
    """A data folder or case file that cannot be used for training (the message names the file)."""


@dataclass(frozen=True)
class CaseRecord:
    """One case. ``slices[i]`` is a slice index that holds labels ``labels[i]`` (2D: slice 0)."""

    name: str  # file name, e.g. "3DBox_CT_STS_STS-001.npz"
    image_path: str  # absolute path of the npz holding ``imgs``
    gt_path: str  # absolute path of the npz holding ``gts`` (= image_path in the training layout)
    token: str  # modality token from the file name ("XRay", "Mammo", ...)
    category: int  # official category index of the token
    ndim: int  # 2 or 3
    shape: tuple[int, ...]  # shape of ``imgs``
    slices: tuple[int, ...]
    labels: tuple[tuple[int, ...], ...]

    @property
    def key(self) -> str:
        """A short stable id, safe as a folder name: the file stem and a hash of its path."""
        digest = hashlib.sha1(self.image_path.encode()).hexdigest()[:8]
        return f"{Path(self.name).stem}-{digest}"

    @property
    def modality(self) -> str:
        return CATEGORIES[self.category]


@dataclass(frozen=True)
class DataIndex:
    cases: tuple[CaseRecord, ...]

    @property
    def tokens(self) -> tuple[str, ...]:
        """The distinct modality tokens, sorted (the rows of the text-feature table)."""
        return tuple(sorted({c.token for c in self.cases}))

    def subset(self, ids: Iterable[int]) -> "DataIndex":
        return DataIndex(cases=tuple(self.cases[i] for i in ids))

    def num_slices(self) -> int:
        return sum(len(c.slices) for c in self.cases)


def find_case_files(data_dirs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(image file, gt file) pairs of every case under the given folders, sorted by path.

    A folder with ``imgs/`` and ``gts/`` sub-folders is read in the validation layout (every image
    must have its gt), any other folder recursively in the training layout.
    """
    pairs: list[tuple[Path, Path]] = []
    for d in data_dirs:
        d = Path(d).resolve()
        if not d.is_dir():
            raise DataError(f"{d}: no such data folder")
        if (d / "imgs").is_dir() and (d / "gts").is_dir():
            for img in sorted((d / "imgs").glob("*.npz")):
                gt = d / "gts" / img.name
                if not gt.is_file():
                    raise DataError(f"{img}: no ground truth {gt} (validation layout: imgs/ and gts/ share names)")
                pairs.append((img, gt))
        else:
            pairs.extend((p, p) for p in sorted(d.rglob("*.npz")))
    if not pairs:
        raise DataError(f"no .npz cases under {', '.join(str(d) for d in data_dirs)}")
    return pairs


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_arrays(image_path: str | Path, gt_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(imgs, gts) of one case as stored, with shape checks that name the file."""
    try:
        with np.load(image_path, allow_pickle=False) as f:
            if "imgs" not in f:
                raise DataError(f"{image_path}: no 'imgs' array (keys: {', '.join(f.files)})")
            imgs = f["imgs"]
            if str(gt_path) == str(image_path):
                if "gts" not in f:
                    raise DataError(f"{image_path}: training layout needs 'imgs' and 'gts' in one file "
                                    f"(keys: {', '.join(f.files)}); for the validation layout pass the "
                                    "folder holding imgs/ and gts/")
                gts = f["gts"]
            else:
                with np.load(gt_path, allow_pickle=False) as g:
                    if "gts" not in g:
                        raise DataError(f"{gt_path}: no 'gts' array (keys: {', '.join(g.files)})")
                    gts = g["gts"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{image_path}: not a readable npz ({exc})") from exc
    if imgs.ndim == 3 and imgs.shape[-1] == 1 and gts.ndim == 2:  # (H, W, 1) grey 2D
        imgs = imgs[..., 0]
    if imgs.dtype != np.uint8:
        raise DataError(f"{image_path}: imgs must be uint8, found {imgs.dtype}")
    ok = (imgs.ndim == 2 and gts.shape == imgs.shape) or (
        imgs.ndim == 3 and imgs.shape[-1] == 3 and gts.ndim == 2 and gts.shape == imgs.shape[:2]) or (
        imgs.ndim == 3 and gts.ndim == 3 and gts.shape == imgs.shape)
    if not ok:
        raise DataError(f"{image_path}: imgs {imgs.shape} and gts {gts.shape} do not form a 2D (H,W[,3]) "
                        "or 3D (D,H,W) case")
    return imgs, gts


def _scan_case(img: Path, gt: Path) -> CaseRecord:
    token = modality_token(img.name)
    try:
        category = category_index(token)
    except UnknownModality as exc:
        raise DataError(f"{img}: {exc} (the modality is the token after 2DBox_/3DBox_ in the file name)") from None
    imgs, gts = read_arrays(img, gt)
    if gts.ndim == 3:
        slices, labels = [], []
        for z in range(gts.shape[0]):
            ids = np.unique(gts[z])
            ids = ids[ids != 0]
            if ids.size:
                slices.append(z)
                labels.append(tuple(int(i) for i in ids))
    else:
        ids = np.unique(gts)
        ids = ids[ids != 0]
        slices, labels = ([0], [tuple(int(i) for i in ids)]) if ids.size else ([], [])
    return CaseRecord(name=img.name, image_path=str(img), gt_path=str(gt), token=token, category=category,
                      ndim=3 if gts.ndim == 3 else 2, shape=tuple(int(s) for s in imgs.shape),
                      slices=tuple(slices), labels=tuple(labels))


def _record_from_json(d: dict) -> CaseRecord:
    return CaseRecord(name=d["name"], image_path=d["image_path"], gt_path=d["gt_path"], token=d["token"],
                      category=int(d["category"]), ndim=int(d["ndim"]), shape=tuple(d["shape"]),
                      slices=tuple(d["slices"]), labels=tuple(tuple(x) for x in d["labels"]))


def build_index(data_dirs: Sequence[str | Path], *, cache_path: str | Path | None = None,
                progress: bool = False, write_cache: bool = True) -> DataIndex:
    """Scan the folders; reuse cached entries whose files kept size and mtime; rewrite the cache
    (atomically; ``write_cache=False`` only reads it, as ranks other than 0 do).

    Cases without any label are left out (nothing to prompt).
    """
    pairs = find_case_files(data_dirs)
    cached: dict[str, dict] = {}
    if cache_path is not None and Path(cache_path).is_file():
        try:
            blob = json.loads(Path(cache_path).read_text())
            if blob.get("version") == INDEX_VERSION:
                cached = blob.get("entries", {})
        except (OSError, ValueError):
            cached = {}  # a damaged cache is rebuilt, never trusted
    entries: dict[str, dict] = {}
    records: list[CaseRecord] = []
    it: Iterable = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, desc="index", unit="case")
    for img, gt in it:
        stamp = _stamp(img) + (_stamp(gt) if gt != img else [])
        hit = cached.get(str(img))
        if hit is not None and hit.get("stamp") == stamp and hit.get("gt_path") == str(gt):
            rec = _record_from_json(hit["record"])
        else:
            rec = _scan_case(img, gt)
        entries[str(img)] = {"stamp": stamp, "gt_path": str(gt), "record": asdict(rec)}
        if rec.slices:
            records.append(rec)
    if cache_path is not None and write_cache:
        with atomic_file(cache_path, "w") as f:  # compact: a large training set has many entries
            json.dump({"version": INDEX_VERSION, "entries": entries}, f)
    if not records:
        raise DataError("no case with any label under " + ", ".join(str(d) for d in data_dirs))
    return DataIndex(cases=tuple(records))


def split_by_case(index: DataIndex, *, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train ids, val ids), held out by case and stratified by modality.

    Within each category the cases are ordered by a hash of (seed, file name) and the first
    ``round(val_fraction * n)`` go to validation, keeping at least one case of every category
    in training (a category with a single case is never held out). The order depends only on
    (seed, name), so the folder order does not matter and adding cases moves few existing ones.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_cat: dict[int, list[int]] = {}
    for i, c in enumerate(index.cases):
        by_cat.setdefault(c.category, []).append(i)
    train, val = [], []
    for ids in by_cat.values():
        ids = sorted(ids, key=lambda i: (hashlib.sha256(f"{seed}:{index.cases[i].name}".encode()).hexdigest(),
                                         index.cases[i].image_path))
        n_val = min(int(round(val_fraction * len(ids))), len(ids) - 1) if val_fraction > 0 else 0
        val.extend(ids[:n_val])
        train.extend(ids[n_val:])
    return sorted(train), sorted(val)


def case_slice(imgs: np.ndarray, gts: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) label map of slice z (2D cases: z must be 0)."""
    if gts.ndim == 3:
        img = imgs[z]
        return np.repeat(img[:, :, None], 3, axis=-1), gts[z]
    if z != 0:
        raise IndexError(f"2D case has only slice 0, asked for {z}")
    img = imgs if imgs.ndim == 3 else np.repeat(imgs[:, :, None], 3, axis=-1)
    return img, gts


class CaseReader:
    """Reads case arrays with a small LRU cache (a 3D npz is decompressed whole on each read).

    One instance per process (each data-loader worker gets its own copy).
    """

    def __init__(self, *, max_cases: int = 4) -> None:
        self.max_cases = max_cases
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, rec: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.pop(rec.image_path, None)
        if hit is None:
            hit = read_arrays(rec.image_path, rec.gt_path)
        self._cache[rec.image_path] = hit  # most recent last
        while len(self._cache) > self.max_cases:
            self._cache.pop(next(iter(self._cache)))
        return hit

    def slice(self, rec: CaseRecord, z: int) -> tuple[np.ndarray, np.ndarray]:
        imgs, gts = self.read(rec)
        return case_slice(imgs, gts, z)


def evenly(items: tuple | list, k: int) -> list:
    """Up to k items spread evenly over the sequence (all of them when it is short)."""
    if k <= 0 or len(items) <= k:
        return list(items)
    pos = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in sorted(set(pos.tolist()))]
