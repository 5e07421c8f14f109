"""Segmenting CVPR24 cases: 2D boxes in batched calls, 3D boxes by propagation from the middle slice.

Torch-free. Semantics (DESIGN.md): the modality comes from the file name; later boxes overwrite
earlier ones where masks overlap (the final label of a pixel is the highest box index whose mask
covers it, which makes the compositing order-free); 3D boxes cover z_min..z_max inclusive (the
official MCP-MedSAM script skips both end slices: a deliberate, measured divergence).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import preprocess
from .atomic import write_npz, write_text
from .cases import Case, CaseError, load_case
from .engine import Engine
from .manifest import Manifest
from .modality import ACCEPTED, UnknownModality, modality_token


@dataclass
class PredictOptions:
    default_modality: str | None = None
    max_batch: int = 8  # boxes per decoder call
    encode_batch: int = 4  # slices per encoder call
    cache_slices: int = 64  # 3D: image embeddings kept (4 MB each at 256x64x64 float32)


@dataclass
class CaseResult:
    case: str
    seconds: float = 0.0
    boxes: int = 0
    slices: int = 0  # distinct slices segmented (1 for a 2D image)
    status: str = "ok"
    message: str = ""
    gflops: float = 0.0
    graph_seconds: float = 0.0  # inside graph calls; the rest is reading, pre/post-processing, writing
    segs: np.ndarray | None = field(default=None, repr=False)


def resolve_modality(name: str, manifest: Manifest, default: str | None) -> int:
    """Row of the model's modality table for a case file name (aliases as the official pipeline)."""
    token = modality_token(name)
    row = manifest.modality_row(token)
    if row is not None:
        return row
    if default is not None:
        row = manifest.modality_row(default)
        if row is None:
            raise CaseError(f"--default-modality {default!r} is not accepted; accepted: {', '.join(ACCEPTED)}")
        return row
    raise CaseError(str(UnknownModality(
        f"unknown modality {token!r} in the file name; accepted: {', '.join(manifest.modality_tokens)} "
        f"(or pass --default-modality)")))


class EmbeddingCache:
    """Image embeddings of slices in one preallocated array, evicted least-recently-used.

    The decoder reads them by index from the whole array, so no embedding is ever copied per box.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...]) -> None:
        self.array = np.empty((capacity,) + shape, dtype=np.float32)
        self.slots: OrderedDict[int, int] = OrderedDict()  # key -> slot, oldest first
        self.capacity = capacity

    def slot(self, key: int) -> int:
        self.slots.move_to_end(key)
        return self.slots[key]

    def missing(self, keys: list[int]) -> list[int]:
        return [k for k in dict.fromkeys(keys) if k not in self.slots]

    def put(self, keys: list[int], embeddings: np.ndarray, pinned: set[int]) -> None:
        for key, emb in zip(keys, embeddings):
            if len(self.slots) < self.capacity:
                s = len(self.slots)
            else:
                victim = next((k for k in self.slots if k not in pinned), None)
                if victim is None:
                    raise RuntimeError("embedding cache too small for one decoder batch")
                s = self.slots.pop(victim)
            self.array[s] = emb
            self.slots[key] = s


class Segmenter:
    def __init__(self, engine: Engine, options: PredictOptions | None = None) -> None:
        self.engine = engine
        self.m = engine.manifest
        self.opt = options or PredictOptions()

    # ---------------------------------------------------------------- shared pieces

    def _prompt(self, img: np.ndarray, crop_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Crops (B, 3, E, E) and, with a CLIP tower, CLIP features (B, 512) for boxes in original pixels
        of an (H, W, 3) image or a grey (H, W) slice."""
        m = self.m
        pieces = [preprocess.crop_box(img, b) for b in crop_boxes]
        crops = np.stack([preprocess.resize_aa(p, m.crop_size) for p in pieces])
        feats = None
        if m.has_clip:
            clip_in = np.stack([preprocess.resize_aa(p, m.clip_crop_size) for p in pieces])
            feats = self.engine.clip(clip_in)
        return crops, feats

    def _decode(self, embeddings: np.ndarray, index: np.ndarray, grid_boxes: np.ndarray, crops: np.ndarray,
                feats: np.ndarray | None, row: int) -> np.ndarray:
        """Low-res logits (B, S, S) for B boxes, in calls of at most max_batch boxes."""
        out = []
        n = self.opt.max_batch
        for i in range(0, len(grid_boxes), n):
            sl = slice(i, i + n)
            logits, _, _ = self.engine.decode(
                embeddings=embeddings, embedding_index=index[sl], boxes=grid_boxes[sl], crops=crops[sl],
                modality_index=np.full(len(grid_boxes[sl]), row, np.int64),
                clip_features=None if feats is None else feats[sl])
            out.append(logits)
        return np.concatenate(out) if out else np.zeros((0, self.m.image_size, self.m.image_size), np.float32)

    # ---------------------------------------------------------------- 2D

    def segment_2d(self, case: Case, row: int) -> np.ndarray:
        img = case.image
        h, w = img.shape[:2]
        segs = np.zeros((h, w), dtype=case.label_dtype)
        if not len(case.boxes):
            return segs
        s = self.m.image_size
        x, new_hw = preprocess.encoder_input(img, s)
        emb = self.engine.encode(x[None])
        grid = np.stack([preprocess.box_to_grid(b, h, w, s) for b in case.boxes])
        crops, feats = self._prompt(img, case.boxes)
        logits = self._decode(emb, np.zeros(len(grid), np.int64), grid, crops, feats, row)
        for label, lg in enumerate(logits, start=1):
            mask = preprocess.postprocess_logits(lg, new_hw, (h, w))
            np.maximum(segs, label, out=segs, where=mask)
        return segs

    # ---------------------------------------------------------------- 3D

    def segment_3d(self, case: Case, row: int) -> tuple[np.ndarray, int]:
        """Propagation per box from its middle slice up and down (DESIGN.md), all boxes advanced
        together so that each decoder call carries one step of several walks."""
        vol = case.image
        d, h, w = vol.shape
        m = self.m
        s, margin = m.image_size, m.propagation_margin
        segs = np.zeros((d, h, w), dtype=case.label_dtype)
        if not len(case.boxes):
            return segs, 0
        new_hw = preprocess.resized_shape(h, w, s)
        cache = EmbeddingCache(max(self.opt.cache_slices, 2 * self.opt.max_batch),
                               (m.embed_dim, m.embedding_size, m.embedding_size))
        slices_done: set[int] = set()

        # A walk: (label, box2d in original pixels, z, step, previous mask or None).
        walks = []
        for label, b in enumerate(case.boxes, start=1):
            x0, y0, z0, x1, y1, z1 = (int(v) for v in b)
            walks.append({"label": label, "box": np.array([x0, y0, x1, y1]), "z": (z0 + z1) // 2,
                          "step": 0, "lo": z0, "hi": z1, "prev": None})
        pending = walks
        while pending:
            batch, pending = pending[: self.opt.max_batch], pending[self.opt.max_batch:]
            zs = [wk["z"] for wk in batch]
            self._ensure_encoded(vol, zs, cache, new_hw)
            crop_boxes, grid = [], []
            for wk in batch:
                prev = wk["prev"]
                if prev is not None and prev.any():
                    cb, g = preprocess.propagated_prompt(prev, new_hw, s, margin)
                    grid.append(g)
                    crop_boxes.append(cb)
                else:
                    grid.append(preprocess.box_to_grid(wk["box"], h, w, s))
                    crop_boxes.append(wk["box"])
            index = np.array([cache.slot(z) for z in zs], np.int64)
            # Crops come from each walk's own slice (grey: repeated to 3 channels after cropping).
            crops, feats = [], []
            for wk, cb in zip(batch, crop_boxes):
                c, f = self._prompt(vol[wk["z"]], np.asarray(cb)[None])
                crops.append(c)
                feats.append(f)
            crops_arr = np.concatenate(crops)
            feats_arr = None if feats[0] is None else np.concatenate(feats)
            logits = self._decode(cache.array, index, np.stack(grid).astype(np.float32), crops_arr, feats_arr, row)
            nxt = []
            for wk, lg in zip(batch, logits):
                mask = preprocess.postprocess_logits(lg, new_hw, (h, w))
                z = wk["z"]
                slices_done.add(z)
                np.maximum(segs[z], wk["label"], out=segs[z], where=mask)
                if wk["step"] == 0:  # the middle slice starts one walk up and one walk down
                    for dz, end in ((1, wk["hi"]), (-1, wk["lo"])):
                        if (z + dz - end) * dz <= 0:
                            nxt.append({**wk, "z": z + dz, "step": dz, "prev": mask})
                elif (z + wk["step"] - (wk["hi"] if wk["step"] > 0 else wk["lo"])) * wk["step"] <= 0:
                    nxt.append({**wk, "z": z + wk["step"], "prev": mask})
            pending = pending + nxt
        return segs, len(slices_done)

    def _ensure_encoded(self, vol: np.ndarray, zs: list[int], cache: EmbeddingCache, new_hw: tuple[int, int]) -> None:
        todo = cache.missing(zs)
        pinned = set(zs)
        s = self.m.image_size
        for i in range(0, len(todo), self.opt.encode_batch):
            chunk = todo[i: i + self.opt.encode_batch]
            x = np.stack([preprocess.encoder_input(vol[z], s)[0] for z in chunk])
            cache.put(chunk, self.engine.encode(x), pinned)

    # ---------------------------------------------------------------- a case

    def segment(self, case: Case, default_modality: str | None) -> CaseResult:
        row = resolve_modality(case.name, self.m, default_modality)
        if case.is_3d:
            segs, slices = self.segment_3d(case, row)
        else:
            segs, slices = self.segment_2d(case, row), 1
        return CaseResult(case=case.name, boxes=len(case.boxes), slices=slices, segs=segs)


TIMING_FIELDS = ("case", "seconds", "boxes", "slices", "status", "message")


def timing_csv(results: list[CaseResult]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(TIMING_FIELDS)
    for r in results:
        wr.writerow([r.case, f"{r.seconds:.3f}", r.boxes, r.slices, r.status, r.message])
    return buf.getvalue()


def run_case(segmenter: Segmenter, path: Path, out_dir: Path, options: PredictOptions,
             overlays: Path | None = None) -> CaseResult:
    """Load, segment and write one case; never raises for a problem with the case itself."""
    t0 = time.perf_counter()
    stats = segmenter.engine.stats
    flops0, graph0 = stats.gflops(segmenter.m), sum(stats.seconds.values())
    try:
        case = load_case(path)
        result = segmenter.segment(case, options.default_modality)
        write_npz(out_dir / path.name, segs=result.segs)
        if overlays is not None:
            from .overlay import write_overlay

            write_overlay(overlays / f"{path.stem}.png", case, result.segs)
    except CaseError as exc:
        result = CaseResult(case=path.name, status="failed", message=str(exc))
    except MemoryError:
        result = CaseResult(case=path.name, status="failed", message="out of memory")
    except Exception as exc:  # an internal error must not take the other cases down
        result = CaseResult(case=path.name, status="error", message=f"{exc.__class__.__name__}: {exc}")
    result.seconds = time.perf_counter() - t0
    result.gflops = stats.gflops(segmenter.m) - flops0
    result.graph_seconds = sum(stats.seconds.values()) - graph0
    result.segs = None
    return result


def predict_folder(inputs: Path, outputs: Path, *, weights: Path, backend: str = "openvino",
                   overlays: Path | None = None, options: PredictOptions | None = None,
                   timing: Path | None = None, cache_dir: Path | None = None, threads: int | None = None,
                   progress: bool | None = None) -> list[CaseResult]:
    """Segment every ``*.npz`` in ``inputs`` (sorted) into ``outputs``; returns one result per case.

    The timing CSV (default ``outputs/timing.csv``) is rewritten atomically after every case, so it
    is complete up to the last finished case even if the run is killed.
    """
    from .engine import default_cache_dir
    from .manifest import load_manifest

    options = options or PredictOptions()
    if not inputs.is_dir():
        raise CaseError(f"input folder {inputs} does not exist")
    files = sorted(p for p in inputs.glob("*.npz") if p.is_file())
    if not files:
        raise CaseError(f"no .npz cases in {inputs}")
    outputs.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(weights)
    engine = Engine(manifest, backend=backend, cache_dir=cache_dir or default_cache_dir(), threads=threads)
    segmenter = Segmenter(engine, options)
    timing = timing if timing is not None else outputs / "timing.csv"
    show = sys.stderr.isatty() if progress is None else progress
    results: list[CaseResult] = []
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(files), file=sys.stderr, unit="case", dynamic_ncols=True)
    for path in files:
        if bar is not None:
            bar.set_postfix_str(path.name[:40])
        r = run_case(segmenter, path, outputs, options, overlays)
        results.append(r)
        if r.status != "ok":
            print(f"{r.case}: {r.status}: {r.message}", file=sys.stderr, flush=True)
        write_text(timing, timing_csv(results))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results
