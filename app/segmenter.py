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
from .errors import InputError, UnknownModality
from .manifest import Manifest, bundled_weights, load_manifest
from .modality import accepted_token


@dataclass(frozen=True)
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

    def following(self, mask: np.ndarray) -> list[Walk]:
        """The walks that continue from this slice once its mask is known (none past the z range)."""
        steps = (1, -1) if self.step == 0 else (self.step,)
        return [Walk(self.label, self.box, self.z + d, self.lo, self.hi, d, mask)
                for d in steps if self.lo <= self.z + d <= self.hi]


class Segmenter:
    """An exported MCP-MedSAM model behind array calls.

    Images are (H, W, 3) or grey (H, W) uint8; volumes (D, H, W) uint8 (one channel per slice, as
    the CVPR24 cases). Boxes are pixel indices, max inclusive: (N, 4) ``x0, y0, x1, y1`` for 2D,
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

    def decode(self, embedding: Embedding, boxes: np.ndarray, modality: str
               ) -> tuple[np.ndarray, np.ndarray | float]:
        """Masks of boxes on an embedded image: only the per-box graph runs.

        boxes (4,) -> ((H, W) bool mask, float predicted IoU); (N, 4) -> ((N, H, W) bool, (N,) float32).
        """
        single = np.ndim(boxes) == 1
        h, w = embedding.shape
        checked = prompts.check_boxes(np.asarray(boxes), (w, h))
        row = self.modality_row(modality)
        logits, iou = self._decode_on(embedding, checked, row)
        masks = np.stack([preprocess.postprocess_logits(lg, embedding.new_hw, (h, w)) for lg in logits]) \
            if len(logits) else np.zeros((0, h, w), bool)
        return (masks[0], float(iou[0])) if single else (masks, iou)

    def segment_image(self, image: np.ndarray, boxes: np.ndarray, modality: str) -> np.ndarray:
        """(H, W, 3) or (H, W) image, (N, 4) boxes -> (H, W) labels 1..N (0 = background)."""
        img = preprocess.check_image(image, volume=False)
        h, w = img.shape[:2]
        checked = prompts.check_boxes(np.asarray(boxes), (w, h))
        self.modality_row(modality)  # bad boxes or modality fail before the encoder runs
        if not len(checked):
            return np.zeros((h, w), dtype=prompts.label_dtype(0))
        return self.segment_embedding(self.embed(img), checked, modality)[0]

    def segment_embedding(self, embedding: Embedding, boxes: np.ndarray, modality: str
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) boxes on an embedded image -> ((H, W) labels 1..N, (N,) float32 predicted IoU).

        What :meth:`segment_image` gives for the same image and boxes, without running the encoder
        again (interactive use: embed once, then label any number of box sets)."""
        h, w = embedding.shape
        checked = prompts.check_boxes(np.asarray(boxes), (w, h))
        row = self.modality_row(modality)
        segs = np.zeros((h, w), dtype=prompts.label_dtype(len(checked)))
        if not len(checked):
            return segs, np.zeros(0, np.float32)
        logits, iou = self._decode_on(embedding, checked, row)
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
        segs = np.zeros((d, h, w), dtype=prompts.label_dtype(len(checked)))
        if not len(checked):
            return segs
        m = self.manifest
        s, margin = m.image_size, m.propagation_margin
        new_hw = preprocess.resized_shape(h, w, s)
        if cache is None:
            cache = self.slice_cache(self.cache_slices)
        mids = (checked[:, 2] + checked[:, 5]) // 2 if starts is None else np.asarray(starts, np.int64).reshape(-1)
        if len(mids) != len(checked) or ((mids < checked[:, 2]) | (mids > checked[:, 5])).any():
            raise InputError(f"starts {mids.tolist()} must give one slice per box, each within its z range")
        pending = [Walk(label, b[[0, 1, 3, 4]], int(z), int(b[2]), int(b[5]))
                   for label, (b, z) in enumerate(zip(checked, mids), start=1)]
        done, total = 0, int((checked[:, 5] - checked[:, 2] + 1).sum())  # box-slices to decode
        while pending:
            batch, pending = pending[: self.max_batch], pending[self.max_batch:]
            zs = [wk.z for wk in batch]
            self._ensure_encoded(vol, zs, cache, new_hw)
            crop_boxes, grid = [], []
            for wk in batch:
                if wk.prev is not None and wk.prev.any():
                    cb, g = prompts.propagated_prompt(wk.prev, new_hw, s, margin)
                else:
                    cb, g = wk.box, prompts.box_to_grid(wk.box, h, w, s)
                crop_boxes.append(cb)
                grid.append(g)
            # Crops come from each walk's own slice (grey: repeated to 3 channels after cropping).
            pieces = [self._content(vol[wk.z], np.asarray(cb)[None]) for wk, cb in zip(batch, crop_boxes)]
            crops = np.concatenate([c for c, _ in pieces])
            feats = None if pieces[0][1] is None else np.concatenate([f for _, f in pieces])
            index = np.array([cache.slot(z) for z in zs], np.int64)
            logits, _ = self._decode_logits(cache.array, index, np.stack(grid), crops, feats, row)
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
        pixels of an (H, W, 3) image or a grey (H, W) slice."""
        m = self.manifest
        crops = prompts.content_crops(img, crop_boxes, m.crop_size)
        feats = None
        if m.has_clip:
            feats = self.engine.clip(prompts.content_crops(img, crop_boxes, m.clip_crop_size))
        return crops, feats

    def _decode_on(self, emb: Embedding, boxes: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, S, S) and IoU (B,) for (B, 4) checked boxes on one embedded image."""
        h, w = emb.shape
        grid = np.stack([prompts.box_to_grid(b, h, w, self.manifest.image_size) for b in boxes])
        crops, feats = self._content(emb.image, boxes)
        return self._decode_logits(emb.embedding, np.zeros(len(boxes), np.int64), grid, crops, feats, row)

    def _decode_logits(self, embeddings: np.ndarray, index: np.ndarray, grid_boxes: np.ndarray, crops: np.ndarray,
                       feats: np.ndarray | None, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits (B, S, S) and IoU (B,) for B boxes, in calls of at most max_batch boxes."""
        logits, ious = [], []
        n = self.max_batch
        for i in range(0, len(grid_boxes), n):
            sl = slice(i, i + n)
            lg, iou, _ = self.engine.decode(prompts.decoder_feed(
                embeddings=embeddings, embedding_index=index[sl], boxes=grid_boxes[sl], crops=crops[sl],
                modality_index=np.full(len(grid_boxes[sl]), row, np.int64),
                clip_features=None if feats is None else feats[sl]))
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
