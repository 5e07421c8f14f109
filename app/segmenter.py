"""The array API: a model folder in, arrays in, label arrays out (shaped like SAM's ``SamPredictor``).

Torch-free. Semantics (docs/ARCHITECTURE.md): later boxes overwrite earlier ones where masks
overlap (the label of a pixel is the highest box index whose mask covers it, which makes the
compositing order-free); 3D boxes are propagated from their middle slice up and down and cover
z_min..z_max inclusive (the official MCP-MedSAM script skips both end slices: a deliberate,
measured divergence).

>>> seg = Segmenter.load()                                    # the bundled default model
>>> labels = seg.segment_image(img, [[10, 20, 120, 140]], modality="XRay")
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import preprocess, prompts
from .engine import Engine
from .errors import InputError, ManifestError, UnknownModality
from .manifest import Manifest, bundled_weights, load_manifest
from .modality import accepted_token
from .prompts import POINT_INPUTS


@dataclass(frozen=True, repr=False)
class Embedding:
    """An embedded 2D image (or one slice), ready for any number of :meth:`Segmenter.decode` calls.

    image: (H, W, 3) uint8 as given (crops come from it); embedding: (1, C, E, E) float32;
    new_hw: the image's size on the encoder grid before padding.
    """

    image: np.ndarray
    embedding: np.ndarray
    new_hw: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def __repr__(self) -> str:  # the arrays' shapes, not their millions of numbers
        return (f"Embedding(image={self.image.shape} {self.image.dtype}, embedding={self.embedding.shape} "
                f"{self.embedding.dtype}, new_hw={self.new_hw})")


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


@dataclass
class Walk:
    """One 3D box being propagated: the slice it is on and how it got there.

    box: (4,) x0, y0, x1, y1 of the given box in original pixels (the prompt on the middle slice and
    the fallback after an empty mask); lo..hi: the box's z range, inclusive; step: 0 on the middle
    slice, then +1 (walking up) or -1 (down); prev: the previous slice's (H, W) bool mask.
    """

    label: int
    box: np.ndarray
    z: int
    lo: int
    hi: int
    step: int = 0
    prev: np.ndarray | None = None
    home: int | None = None  # clicks: the slice the given box belongs to (z_mid) when the walk starts elsewhere

    def following(self, mask: np.ndarray) -> list[Walk]:
        """The walks that continue from this slice once its mask is known (none past the z range)."""
        steps = (1, -1) if self.step == 0 else (self.step,)
        return [Walk(self.label, self.box, self.z + d, self.lo, self.hi, d, mask, self.home)
                for d in steps if self.lo <= self.z + d <= self.hi]


class Segmenter:
    """An exported MCP-MedSAM model behind array calls.

    Images are (H, W, 3) or grey (H, W) uint8; volumes (D, H, W) uint8 (one channel per slice, as
    the CVPR24 cases); other integer or float arrays with values in 0..255 are rounded to uint8, and a
    float array in 0..1 with fractions (a 0..1 scaling) is refused with an InputError. Boxes are pixel
    indices, max inclusive: (N, 4) ``x0, y0, x1, y1`` for 2D,
    (N, 6) ``x0, y0, z0, x1, y1, z1`` for 3D (x = column, y = row, z = slice); boxes partly outside
    are clipped. Labels are box indices 1..N, uint8 up to 255 boxes, else uint16. ``modality`` is
    one of :attr:`modalities` (the official tokens and aliases; case is ignored when unambiguous).
    Errors are :class:`mcp_medsam.SegmentationError` subclasses with a message for the user.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, encode_batch: int = 4, cache_slices: int = 64) -> None:
        self.engine = engine
        self.max_batch = max_batch  # boxes per decoder call
        self.encode_batch = encode_batch  # slices per encoder call
        self.cache_slices = cache_slices  # 3D: image embeddings kept (4 MB each at 256x64x64 float32)

    @classmethod
    def load(cls, weights: str | Path | None = None, *, backend: str = "openvino", threads: int | None = None,
             cache_dir: str | Path | None = None, max_batch: int = 8, cache_slices: int = 64,
             precision: str | None = None) -> Segmenter:
        """The model of an exported folder (``manifest.json``); None: the bundled default weights.

        backend: ``openvino`` (default) or ``onnxruntime`` (needs the folder's ONNX files);
        threads: CPU threads for inference (default: all cores); cache_dir: OpenVINO's
        compiled-model cache (default: $MCP_MEDSAM_CACHE or ~/.cache/mcp-medsam/openvino);
        precision: ``auto`` (the fastest variant of the folder that held its agreement bars and that
        this CPU supports, else fp32), ``fp32``, ``bf16`` or ``int8``; None: $MCP_MEDSAM_PRECISION,
        else auto. ``seg.precision`` says which one runs.
        """
        from .engine import default_cache_dir

        if weights is not None and not Path(weights).is_dir():
            raise ManifestError(f"model folder {weights}: " + ("not a folder" if Path(weights).exists() else
                                                               "no such folder"))
        manifest = load_manifest(Path(weights) if weights is not None else bundled_weights())
        engine = Engine(manifest, backend=backend, threads=threads, precision=precision,
                        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir())
        return cls(engine, max_batch=max_batch, cache_slices=cache_slices)

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest

    @property
    def precision(self) -> str:
        """The precision the model runs at: ``fp32``, ``bf16`` or ``int8`` (a variant of the folder)."""
        return self.engine.precision

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality strings this model accepts (rows of its modality table)."""
        return self.manifest.modality_tokens

    @property
    def supports_points(self) -> bool:
        """Whether the model takes click prompts (its per-box graph has ``point_coords`` and ``point_labels``)."""
        return POINT_INPUTS <= set(self.manifest.graphs["decoder"].inputs)

    def _need_points(self) -> None:
        if not self.supports_points:
            raise InputError(f"clicks need a model with point prompts; the model in {self.manifest.folder} takes "
                             f"box prompts only")

    def modality_row(self, modality: str) -> int:
        """Row of the model's modality table for a modality string; raises UnknownModality."""
        row = self.manifest.modality_row(accepted_token(modality))
        if row is None:
            raise UnknownModality(f"modality {modality!r} is not in this model's table; accepted: "
                                  f"{', '.join(self.modalities)}")
        return row

    # ---------------------------------------------------------------- 2D

    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder once on a 2D image (or a slice): the input of :meth:`decode`."""
        img = preprocess.check_image(image, volume=False)
        x, new_hw = preprocess.encoder_input(img, self.manifest.image_size)
        return Embedding(image=img, embedding=self.engine.encode(x[None]), new_hw=new_hw)

    def decode(self, embedding: Embedding, boxes: np.ndarray, modality: str, *, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | float]:
        """Masks of boxes on an embedded image: only the per-box graph runs.

        boxes (4,) -> ((H, W) bool mask, float predicted IoU); (N, 4) -> ((N, H, W) bool, (N,) float32).
        points (N, P, 2) x, y pixel indices ((P, 2) with one (4,) box) and point_labels (N, P)
        1 foreground / 0 background / -1 padding: clicks on each box's object (models with
        :attr:`supports_points` only).
        """
        single = np.ndim(boxes) == 1
        h, w = embedding.shape
        checked = prompts.check_boxes(np.asarray(boxes), (w, h))
        row = self.modality_row(modality)
        clicks = self._check_clicks(points, point_labels, len(checked), (h, w))
        logits, iou = self._decode_on(embedding, checked, row, clicks)
        masks = np.stack([preprocess.postprocess_logits(lg, embedding.new_hw, (h, w)) for lg in logits]) \
            if len(logits) else np.zeros((0, h, w), bool)
        return (masks[0], float(iou[0])) if single else (masks, iou)

    def segment_image(self, image: np.ndarray, boxes: np.ndarray, modality: str, *, points: np.ndarray | None = None,
                      point_labels: np.ndarray | None = None) -> np.ndarray:
        """(H, W, 3) or (H, W) image, (N, 4) boxes -> (H, W) labels 1..N (0 = background).

        points, point_labels: clicks per box as in :meth:`decode`."""
        img = preprocess.check_image(image, volume=False)
        h, w = img.shape[:2]
        checked = prompts.check_boxes(np.asarray(boxes), (w, h))
        self.modality_row(modality)  # bad boxes, clicks or modality fail before the encoder runs
        self._check_clicks(points, point_labels, len(checked), (h, w))
        if not len(checked):
            return np.zeros((h, w), dtype=prompts.label_dtype(0))
        return self.segment_embedding(self.embed(img), checked, modality, points=points, point_labels=point_labels)[0]

    def segment_embedding(self, embedding: Embedding, boxes: np.ndarray, modality: str, *,
                          points: np.ndarray | None = None, point_labels: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) boxes on an embedded image -> ((H, W) labels 1..N, (N,) float32 predicted IoU).

        What :meth:`segment_image` gives for the same image and boxes, without running the encoder
        again (interactive use: embed once, then label any number of box and click sets)."""
        h, w = embedding.shape
        checked = prompts.check_boxes(np.asarray(boxes), (w, h))
        row = self.modality_row(modality)
        clicks = self._check_clicks(points, point_labels, len(checked), (h, w))
        segs = np.zeros((h, w), dtype=prompts.label_dtype(len(checked)))
        if not len(checked):
            return segs, np.zeros(0, np.float32)
        logits, iou = self._decode_on(embedding, checked, row, clicks)
        for label, lg in enumerate(logits, start=1):
            mask = preprocess.postprocess_logits(lg, embedding.new_hw, (h, w))
            np.maximum(segs, label, out=segs, where=mask)
        return segs, iou

    # ---------------------------------------------------------------- 3D

    def segment_volume(self, volume: np.ndarray, boxes: np.ndarray, modality: str, *,
                       cache: EmbeddingCache | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       starts: np.ndarray | None = None) -> np.ndarray:
        """(D, H, W) volume, (N, 6) boxes -> (D, H, W) labels 1..N, by propagation per box.

        Each box starts on its middle slice ``(z0 + z1) // 2`` with the given 2D box and walks up
        and down to z1 and z0; the next slice's prompt is the previous mask's box (+3 px), or the
        given box after an empty mask. All walks advance together, so one decoder call carries a
        step of several boxes, and each slice is encoded once (kept in a bounded cache).

        cache: slice embeddings of this volume kept between calls (:meth:`slice_cache`; default: a
        new one per call); progress(done, total): called after each decoder step with the box-slices
        decoded so far and the call's total; starts: (N,) slice each box starts on with its given box
        (the CVPR 2025 ``z_mid``; within the box's z range), default the middle slice.
        """
        vol = preprocess.check_image(volume, volume=True)
        d, h, w = vol.shape
        checked = prompts.check_boxes(np.asarray(boxes), (w, h, d))
        row = self.modality_row(modality)
        mids = (checked[:, 2] + checked[:, 5]) // 2 if starts is None else np.asarray(starts, np.int64).reshape(-1)
        if len(mids) != len(checked) or ((mids < checked[:, 2]) | (mids > checked[:, 5])).any():
            raise InputError(f"starts {mids.tolist()} must give one slice per box, each within its z range")
        walks = [Walk(label, b[[0, 1, 3, 4]], int(z), int(b[2]), int(b[5]))
                 for label, (b, z) in enumerate(zip(checked, mids), start=1)]
        return self._propagate(vol, walks, row, cache, progress)

    def refine_volume(self, volume: np.ndarray, boxes: np.ndarray, modality: str, *, points: np.ndarray,
                      point_labels: np.ndarray, prev: np.ndarray | None = None, cache: EmbeddingCache | None = None,
                      progress: Callable[[int, int], None] | None = None, starts: np.ndarray | None = None
                      ) -> np.ndarray:
        """(D, H, W) volume, (N, 6) boxes and clicks -> (D, H, W) labels 1..N (models with
        :attr:`supports_points` only).

        points (N, P, 3) x, y, z voxel indices and point_labels (N, P) 1 fg / 0 bg / -1 padding:
        each box's clicks in the order they were made (the last real point is the newest).

        The 3D rule: a box without clicks is propagated as :meth:`segment_volume` does. A box with
        clicks is re-propagated from the slice of its newest click, up and down to the ends of its
        z range (widened to take in every foreground click); every slice's prompt carries the clicks
        made on that slice, so earlier clicks keep acting on their slices, and the box's own slice
        (``starts``, default the middle) keeps the given box. The newest click's slice is prompted
        with the box of the previous result there (+3 px, as propagation; the given box where that
        is empty) widened to take in the slice's foreground clicks, like every propagated prompt.

        prev: (D, H, W) labels 1..N of the previous result (a CVPR 2025 ``prev_pred``); None: the
        result without each box's newest click, computed here (one more pass per click).
        """
        vol = preprocess.check_image(volume, volume=True)
        d, h, w = vol.shape
        checked = prompts.check_boxes(np.asarray(boxes), (w, h, d))
        row = self.modality_row(modality)
        clicks = self._check_clicks(points, point_labels, len(checked), (w, h, d)) or \
            [(np.zeros((0, 3), np.int64), np.zeros(0, np.int64))] * len(checked)  # no clicks: the box round
        mids = (checked[:, 2] + checked[:, 5]) // 2 if starts is None else np.asarray(starts, np.int64).reshape(-1)
        if len(mids) != len(checked) or ((mids < checked[:, 2]) | (mids > checked[:, 5])).any():
            raise InputError(f"starts {mids.tolist()} must give one slice per box, each within its z range")
        if prev is not None:
            prev = np.asarray(prev)
            if prev.shape != vol.shape or prev.dtype.kind not in "iu":
                raise InputError(f"prev has shape {prev.shape} and dtype {prev.dtype}; expected integer labels "
                                 f"shaped like the volume {vol.shape}")
        elif any(len(lab) for _, lab in clicks):
            older = prompts.pad_points([pts[:-1] for pts, _ in clicks], [lab[:-1] for _, lab in clicks], dim=3)
            prev = self.refine_volume(vol, checked, modality, points=older[0].astype(np.int64), point_labels=older[1],
                                      cache=cache, starts=mids)
        walks = []
        for label, (b, z, (pts, lab)) in enumerate(zip(checked, mids, clicks), start=1):
            lo, hi = int(b[2]), int(b[5])
            if not len(lab):
                walks.append(Walk(label, b[[0, 1, 3, 4]], int(z), lo, hi))
                continue
            fg_z = pts[lab == 1, 2].tolist()
            lo, hi = min([lo, *fg_z]), max([hi, *fg_z])
            newest = min(max(int(pts[-1, 2]), lo), hi)  # a background click beyond the range: start at its end
            walks.append(Walk(label, b[[0, 1, 3, 4]], newest, lo, hi, 0, prev[newest] == label, int(z)))
        return self._propagate(vol, walks, row, cache, progress, clicks)

    def _propagate(self, vol: np.ndarray, pending: list[Walk], row: int, cache: EmbeddingCache | None,
                   progress: Callable[[int, int], None] | None,
                   clicks: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
        """Labels (D, H, W) of walks advanced together (:meth:`segment_volume`, :meth:`refine_volume`);
        clicks: per walk (by label) its (P, 3) x, y, z points and (P,) labels, acting on their slices."""
        d, h, w = vol.shape
        segs = np.zeros((d, h, w), dtype=prompts.label_dtype(len(pending)))
        if not pending:
            return segs
        m = self.manifest
        s, margin = m.image_size, m.propagation_margin
        new_hw = preprocess.resized_shape(h, w, s)
        if cache is None:
            cache = self.slice_cache(self.cache_slices)
        done, total = 0, sum(wk.hi - wk.lo + 1 for wk in pending)  # box-slices to decode
        while pending:
            batch, pending = pending[: self.max_batch], pending[self.max_batch:]
            zs = [wk.z for wk in batch]
            self._ensure_encoded(vol, zs, cache, new_hw)
            crop_boxes, grid, on_slice = [], [], []
            for wk in batch:
                if wk.prev is not None and wk.prev.any() and wk.z != wk.home:
                    cb, g = prompts.propagated_prompt(wk.prev, new_hw, s, margin)
                else:
                    cb, g = wk.box, prompts.box_to_grid(wk.box, h, w, s)
                if clicks is not None:
                    pts, lab = clicks[wk.label - 1]
                    here = pts[:, 2] == wk.z
                    xy, kinds = pts[here, :2], lab[here]
                    cb, g = prompts.box_with_points(cb, g, xy[kinds == 1], (h, w), s, margin)
                    on_slice.append((prompts.points_to_grid(xy, h, w, s), kinds))
                crop_boxes.append(cb)
                grid.append(g)
            # Crops come from each walk's own slice (grey: repeated to 3 channels after cropping).
            pieces = [self._content(vol[wk.z], np.asarray(cb)[None]) for wk, cb in zip(batch, crop_boxes)]
            crops = np.concatenate([c for c, _ in pieces])
            feats = None if pieces[0][1] is None else np.concatenate([f for _, f in pieces])
            index = np.array([cache.slot(z) for z in zs], np.int64)
            grid_points = prompts.pad_points(*zip(*on_slice)) if on_slice else None
            logits, _ = self._decode_logits(cache.array, index, np.stack(grid), crops, feats, row, grid_points)
            for wk, lg in zip(batch, logits):
                mask = preprocess.postprocess_logits(lg, new_hw, (h, w))
                np.maximum(segs[wk.z], wk.label, out=segs[wk.z], where=mask)
                pending.extend(wk.following(mask))
            done += len(batch)
            if progress is not None:
                progress(done, total)
        return segs

    def slice_cache(self, slices: int) -> EmbeddingCache:
        """An empty cache for the embeddings of ``slices`` slices of one volume (at least two decoder
        batches; 4 MB per slice at 256x64x64 float32): pass it to :meth:`segment_volume` calls."""
        m = self.manifest
        return EmbeddingCache(max(slices, 2 * self.max_batch), (m.embed_dim, m.embedding_size, m.embedding_size))

    # ---------------------------------------------------------------- shared pieces

    def _content(self, img: np.ndarray, crop_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Crops (B, 3, E, E) and, with a CLIP tower, CLIP features (B, 512) for boxes in original
        pixels of an (H, W, 3) image or a grey (H, W) slice. Crops are (B, 0) where the per-box graph
        does not read them (its crop CNN folded into a constant at export): none is computed."""
        m = self.manifest
        crops = (prompts.content_crops(img, crop_boxes, m.crop_size) if m.reads_crops
                 else np.zeros((len(crop_boxes), 0), np.float32))
        feats = None
        if m.has_clip:
            feats = self.engine.clip(prompts.content_crops(img, crop_boxes, m.clip_crop_size))
        return crops, feats

    def _check_clicks(self, points: np.ndarray | None, labels: np.ndarray | None, n_boxes: int,
                      dims: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per box its real clicks ((P, k) int64 points, (P,) labels) in the order given; None without
        points. dims: (H, W) for 2D (as ``Embedding.shape``) or (W, H, D) for 3D."""
        if points is None and labels is None:
            return None
        if points is None or labels is None:
            raise InputError("points and point_labels go together (point_labels: 1 foreground, 0 background)")
        self._need_points()
        if len(dims) == 2:
            dims = (dims[1], dims[0])
        pts, lab = prompts.check_points(points, labels, n_boxes, dims)
        return [(p[lb != prompts.POINT_PAD], lb[lb != prompts.POINT_PAD]) for p, lb in zip(pts, lab)]

    def _decode_on(self, emb: Embedding, boxes: np.ndarray, row: int,
                   clicks: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, S, S) and IoU (B,) for (B, 4) checked boxes (and their clicks) on one embedded image."""
        h, w = emb.shape
        s, margin = self.manifest.image_size, self.manifest.propagation_margin
        grid = np.stack([prompts.box_to_grid(b, h, w, s) for b in boxes]) if len(boxes) else np.zeros((0, 4))
        crop_boxes, points = boxes, None
        if clicks is not None:
            crop_boxes = boxes.copy()
            for i, (pts, lab) in enumerate(clicks):
                crop_boxes[i], grid[i] = prompts.box_with_points(boxes[i], grid[i], pts[lab == 1], (h, w), s, margin)
            points = prompts.pad_points([prompts.points_to_grid(p, h, w, s) for p, _ in clicks],
                                        [lab for _, lab in clicks])
        crops, feats = self._content(emb.image, crop_boxes)
        return self._decode_logits(emb.embedding, np.zeros(len(boxes), np.int64), grid, crops, feats, row, points)

    def _decode_logits(self, embeddings: np.ndarray, index: np.ndarray, grid_boxes: np.ndarray, crops: np.ndarray,
                       feats: np.ndarray | None, row: int, points: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits (B, S, S) and IoU (B,) for B boxes, in calls of at most max_batch boxes.

        points: ((B, P, 2) float32 grid points, (B, P) int64 labels) or None (a model with point
        inputs then gets one padding point per box from the engine: its box-only outputs)."""
        logits, ious = [], []
        n = self.max_batch
        for i in range(0, len(grid_boxes), n):
            sl = slice(i, i + n)
            lg, iou, _ = self.engine.decode(prompts.decoder_feed(
                embeddings=embeddings, embedding_index=index[sl], boxes=grid_boxes[sl], crops=crops[sl],
                modality_index=np.full(len(grid_boxes[sl]), row, np.int64),
                clip_features=None if feats is None else feats[sl],
                points=None if points is None else points[0][sl],
                point_labels=None if points is None else points[1][sl]))
            logits.append(lg)
            ious.append(iou)
        s = self.manifest.image_size
        if not logits:
            return np.zeros((0, s, s), np.float32), np.zeros(0, np.float32)
        return np.concatenate(logits), np.concatenate(ious)

    def _ensure_encoded(self, vol: np.ndarray, zs: list[int], cache: EmbeddingCache, new_hw: tuple[int, int]) -> None:
        todo = cache.missing(zs)
        pinned = set(zs)
        s = self.manifest.image_size
        for i in range(0, len(todo), self.encode_batch):
            chunk = todo[i: i + self.encode_batch]
            x = np.stack([preprocess.encoder_input(vol[z], s)[0] for z in chunk])
            cache.put(chunk, self.engine.encode(x), pinned)
