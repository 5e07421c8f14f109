"""An interactive session: one image, its cached slice embeddings, objects built up from interactions,
and their undo history. Torch-free; the state beside the stateless :class:`~mcp_medsam.Segmenter`.

The nnInteractive protocol (``mcp_medsam.serve.nninteractive``) drives it; the web service and an
interactive evaluation can drive the same class. Axes are the array's own: a volume is (A0, A1, A2)
(napari's (z, y, x)); a 2D box lies on one slice of any axis, and on that slice ``x`` is the later of
the two remaining axes (the column) and ``y`` the earlier (the row).

What the model does with each interaction (MCP-MedSAM takes boxes; it has no mask input):

- 2D box on slice ``s`` of axis ``k``: that slice is segmented with the box, then the object is
  propagated along axis ``k`` slice by slice (each next slice prompted by the previous mask's box,
  as :meth:`Segmenter.segment_volume` does) for as long as the mask is not empty: no z range is given,
  so the object's extent along ``k`` is where it continues. Equivalent Segmenter call: with the
  volume transposed so that ``k`` comes first and ``lo..hi`` the non-empty slices of the result,
  ``segment_volume(vol_k, [[x0, y0, lo, x1, y1, hi]], modality, starts=[s]) == 1``.
- 3D box: a MCP-MedSAM 3D box: propagated along axis 0 from its middle slice over its extent on axis 0
  (exactly ``segment_volume``).
- lasso: its bounding box on its slice, then as a 2D box.
- initial mask: the object's starting mask (the model does not refine it; later boxes add to it or cut
  from it).
- point (models with :attr:`Segmenter.supports_points` only), ``(a0, a1, a2)`` voxel indices; include = a
  foreground click, exclude = a background click. It refines the object's last including box (2D, 3D or
  lasso): that box and every click made since are run again through :meth:`Segmenter.refine_volume` along
  the box's axis (a 3D box: axis 0), the click on its slice of that axis, with the object's mask as
  ``prev``; the box's part of the object is replaced by the result (the rest of the object stays).
  Equivalent Segmenter call, with ``vol_k``/``mask_k`` the volume and the object's mask transposed so that
  the box's axis ``k`` comes first and the clicks as (x, y, z) in that order (z on axis ``k``):
  ``refine_volume(vol_k, [box6], modality, points=[clicks], point_labels=[1 or 0 each], prev=mask_k,
  starts=[s])``, where ``box6`` is ``[x0, y0, lo, x1, y1, hi]`` (max inclusive) with ``lo..hi`` the
  slices the 2D box's walk gave (for a 3D box its own range, ``s`` its middle slice) and ``s`` the box's
  slice. A foreground click on an object with no box starts it: a box of the click's pixel on its
  slice of axis 0 (a one-slice image: of its flat axis; the model widens it by its 3-px margin around
  the click: a 7x7 box) with the click, that one slice (``refine_volume(vol, [[x, y, z, x + 1, y + 1,
  z]], ..., points=[[[x, y, z]]], point_labels=[[1]])``); later foreground clicks on other slices widen
  its range (the refine rule). A background click with no box to refine is refused (InputError).

Per object (one object = one target mask): an including box adds what the model segments to the
object, an excluding one removes it. Undo restores the object (its mask and the interactions a click
refines) as it was before the last step, a step that changed nothing too (several levels, bounded by
``undo_bytes``); reset clears the object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import preprocess, prompts
from ..errors import InputError
from ..io.medical import MedicalImage, to_uint8
from ..modality import accepted_token
from ..segmenter import EmbeddingCache, Segmenter, Walk

log = logging.getLogger("mcp_medsam.interactive")

CT_BELOW = -500.0  # a volume with values below this is taken as CT (Hounsfield units) when no modality is given
Box = list[list[int]]  # per axis [lo, hi), half-open (nnInteractive's convention)


def guess_modality(raw: np.ndarray) -> str:
    """``CT`` when any value is below -500 (air in Hounsfield units), else ``MR``."""
    return "CT" if raw.size and float(np.min(raw)) < CT_BELOW else "MR"


def convert(raw: np.ndarray, modality: str) -> np.ndarray:
    """Native intensities (A0, A1, A2), any numeric dtype -> (A0, A1, A2) uint8 as ``segment`` converts them.

    A volume as ``segment`` converts a volume file of that modality (CT: window L40/W400; others:
    0.5..99.5 percentiles of the voxels above zero); a one-slice volume (an axis of size 1) as a 2D
    image file (8-bit kept, other types percentile-clipped), so a 2D picture gives what ``segment``
    gives on it. Raises InputError (NaN, no voxel above zero, unknown modality, not numbers)."""
    if raw.ndim != 3:
        raise InputError(f"the image has {raw.ndim} spatial axes; expected 3")
    flat = [k for k in range(3) if raw.shape[k] == 1]
    if flat:
        plane = raw.reshape([n for k, n in enumerate(raw.shape) if k != flat[0]])
        out = to_uint8(MedicalImage(array=plane, is_3d=False, source=Path("nninteractive"), format="array"),
                       modality)[:, :, 0]
        return out.reshape(raw.shape)
    return to_uint8(MedicalImage(array=raw, is_3d=True, source=Path("nninteractive"), format="array"), modality)


class _AxisCache:
    """The session's embedding cache seen by :meth:`Segmenter.refine_volume` on the volume transposed so
    that ``axis`` comes first: its slice ``z`` is the session's key ``(axis, z)``, so the slices a box
    embedded are not embedded again for its clicks."""

    def __init__(self, cache: EmbeddingCache, axis: int) -> None:
        self.cache, self.axis = cache, axis

    @property
    def array(self) -> np.ndarray:
        return self.cache.array

    def slot(self, z: int) -> int:
        return self.cache.slot((self.axis, z))

    def missing(self, zs: list[int]) -> list[int]:
        return [z for _, z in self.cache.missing([(self.axis, z) for z in zs])]

    def put(self, zs: list[int], embeddings: np.ndarray, pinned: set[int]) -> None:
        self.cache.put([(self.axis, z) for z in zs], embeddings, {(self.axis, z) for z in pinned})


class _Slices:
    """Slices of a volume by ``(axis, index)`` keys, each a contiguous (H, W) uint8 copy (what the
    Segmenter's encoder step reads with ``source[key]``)."""

    def __init__(self, volume: np.ndarray) -> None:
        self.volume = volume

    def __getitem__(self, key: tuple[int, int]) -> np.ndarray:
        axis, index = key
        return np.ascontiguousarray(np.take(self.volume, index, axis=axis))


@dataclass
class Bits:
    """A bool (A0, A1, A2) mask kept small: the bbox of its voxels (half-open) and their packed bits."""

    bbox: Box | None
    packed: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> Bits:
        box = changed_bbox(np.zeros_like(mask), mask)
        return cls(box, np.packbits(mask[_slicer(box)], axis=None) if box else np.zeros(0, np.uint8))

    def unpack(self, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros(shape, bool)
        if self.bbox is not None:
            sub = tuple(hi - lo for lo, hi in self.bbox)
            out[_slicer(self.bbox)] = np.unpackbits(self.packed, count=int(np.prod(sub))).reshape(sub).astype(bool)
        return out


@dataclass(frozen=True)
class Anchor:
    """What a click refines: a box on ``axis`` as :meth:`Segmenter.refine_volume` takes it in the volume
    transposed so that ``axis`` comes first: ``box`` x0, y0, z0, x1, y1, z1 (max inclusive, z along
    ``axis``) and ``start`` the slice that keeps the given box."""

    axis: int
    box: tuple[int, ...]
    start: int


@dataclass
class Interaction:
    """A prompt as given: ``kind`` bbox2d | bbox3d | lasso | initial | point; ``box`` half-open per axis;
    ``point`` (a0, a1, a2). Boxes that include (and a click that starts an object) are ``anchor`` for
    later clicks; ``region`` is what the anchor's box and its clicks gave last (packed)."""

    kind: str
    include: bool
    box: Box | None = None
    mask: np.ndarray | None = None
    point: tuple[int, int, int] | None = None
    anchor: Anchor | None = None
    region: Bits | None = None


@dataclass
class Step:
    """One undoable change of an object: the region it changed and what was there before (packed bits;
    bbox None: a step that changed nothing), and the object's interactions before it."""

    bbox: Box | None
    before: np.ndarray
    shape: tuple[int, ...]
    interactions: list[Interaction] = field(default_factory=list)
    extra: int = 0  # bytes of the regions the step's interactions keep

    @property
    def nbytes(self) -> int:
        return self.before.nbytes + self.extra


@dataclass
class SegObject:
    """One object: its (A0, A1, A2) bool mask, the interactions that made it, its undo steps (oldest first)."""

    mask: np.ndarray
    interactions: list[Interaction] = field(default_factory=list)
    history: list[Step] = field(default_factory=list)
    pending: list[Interaction] = field(default_factory=list)


def changed_bbox(before: np.ndarray, after: np.ndarray) -> Box | None:
    """Half-open bbox per axis of the voxels that differ, or None."""
    diff = before != after
    if not diff.any():
        return None
    out = []
    for axis in range(diff.ndim):
        other = tuple(k for k in range(diff.ndim) if k != axis)
        idx = np.flatnonzero(diff.any(axis=other))
        out.append([int(idx[0]), int(idx[-1]) + 1])
    return out


def _slicer(bbox: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in bbox)


class InteractiveSession:
    """One image and its objects. Not thread-safe: callers serialise calls per session, and hold the
    engine lock (``engine_lock``) only around model calls, which this class takes itself.

    volume: (A0, A1, A2) uint8 as the model takes it (see :func:`convert`); modality: a token of the
    model's table; cache_slices: slice embeddings kept (4 MB each with the default model);
    undo_bytes: packed pre-images kept per object for undo (oldest dropped first).
    """

    def __init__(self, *, segmenter: Segmenter, volume: np.ndarray, modality: str, cache_slices: int,
                 engine_lock=None, undo_bytes: int = 64 * 2**20, guessed: bool = False) -> None:
        if volume.ndim != 3 or volume.dtype != np.uint8:
            raise InputError(f"the session volume must be (A0, A1, A2) uint8, got {volume.dtype} {volume.shape}")
        self.segmenter = segmenter
        self.volume = volume
        self.modality = accepted_token(modality)
        self.row = segmenter.modality_row(self.modality)
        self.cache: EmbeddingCache | None = None
        self.cache_slices = cache_slices
        self.lock = engine_lock
        self.undo_bytes = undo_bytes
        self.guessed = guessed  # the modality was guessed from the intensities (no modality given)
        self.objects: dict[int, SegObject] = {}
        self._next_id = 1

    @classmethod
    def from_native(cls, *, segmenter: Segmenter, raw: np.ndarray, modality: str | None, cache_slices: int,
                    engine_lock=None) -> InteractiveSession:
        """A session on native intensities (A0, A1, A2); modality None: :func:`guess_modality`."""
        if raw.dtype == np.bool_ or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
            raise InputError(f"image dtype {raw.dtype}; expected numbers (integers or floats)")
        chosen = modality or guess_modality(raw)
        segmenter.modality_row(chosen)
        return cls(segmenter=segmenter, volume=convert(raw, chosen), modality=chosen, cache_slices=cache_slices,
                   engine_lock=engine_lock, guessed=modality is None)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    # ---------------------------------------------------------------- objects

    def new_object(self, initial: np.ndarray | None = None) -> int:
        """A new, empty object (or one starting from an (A0, A1, A2) mask); returns its id."""
        oid = self._next_id
        self._next_id += 1
        self.objects[oid] = SegObject(mask=np.zeros(self.shape, bool))
        if initial is not None:
            self.set_initial(oid, initial)
        return oid

    def drop_object(self, oid: int) -> None:
        self.objects.pop(oid, None)

    def mask(self, oid: int) -> np.ndarray:
        return self._object(oid).mask

    def _object(self, oid: int) -> SegObject:
        if oid not in self.objects:
            raise InputError(f"no object {oid} in this session")
        return self.objects[oid]

    def close(self) -> None:
        """Free the image, the embeddings and every object."""
        self.objects.clear()
        self.cache = None
        self.volume = np.zeros((0, 0, 0), np.uint8)

    # ---------------------------------------------------------------- interactions

    def add_box(self, oid: int, box: Box, *, include: bool = True, run: bool = True) -> Box | None:
        """A box, half-open per axis ``[[lo, hi), ...]``: one axis of size 1 is a 2D box on that slice;
        none of size 1 a 3D box (propagated along axis 0). Returns the changed bbox (None: no change)."""
        kind = "bbox2d" if self._box_axis(self._check_box(box)) is not None else "bbox3d"
        return self._queue(oid, Interaction(kind, include, box=self._check_box(box)), run)

    def add_lasso(self, oid: int, mask: np.ndarray, *, at: Box | None = None, include: bool = True,
                  run: bool = True) -> Box | None:
        """A lasso: a mask filled inside, (A0, A1, A2) or a crop placed at ``at`` (half-open per axis);
        its bounding box on its slice, as a 2D box."""
        at = [[0, n] for n in self.shape] if at is None else self._check_box(at)
        if list(mask.shape) != [hi - lo for lo, hi in at]:
            raise InputError(f"the lasso mask has shape {list(mask.shape)}; its box {at} needs "
                             f"{[hi - lo for lo, hi in at]}")
        box = changed_bbox(np.zeros(mask.shape, bool), mask != 0)
        if box is None:
            raise InputError("the lasso is empty")
        if all(hi - lo > 1 for lo, hi in box):
            raise InputError(f"the lasso spans {[hi - lo for lo, hi in box]} voxels; it must lie on one slice")
        box = [[lo + o, hi + o] for (lo, hi), (o, _) in zip(box, at)]
        return self._queue(oid, Interaction("lasso", include, box=box), run)

    def add_point(self, oid: int, point, *, include: bool = True, run: bool = True) -> Box | None:
        """A click at ``point`` (a0, a1, a2) voxel indices: foreground (include) or background; see the
        module's docstring for what it refines. Needs a model with point prompts."""
        if not self.segmenter.supports_points:
            raise InputError("clicks need a model with point prompts; this model takes boxes only")
        try:
            at = [float(v) for v in point]
        except (TypeError, ValueError):
            raise InputError(f"a point is [a0, a1, a2] voxel indices, got {point!r}") from None
        if len(at) != 3 or not all(np.isfinite(at)):
            raise InputError(f"a point is [a0, a1, a2] voxel indices, got {point!r}")
        p = tuple(int(round(v)) for v in at)
        if any(not 0 <= v < n for v, n in zip(p, self.shape)):
            raise InputError(f"the point {list(p)} lies outside the image {list(self.shape)}")
        return self._queue(oid, Interaction("point", include, point=p), run)

    def set_initial(self, oid: int, mask: np.ndarray) -> Box | None:
        """The object's mask becomes ``mask`` (non-zero = object): one undoable step; interactions reset."""
        if tuple(mask.shape) != self.shape:
            raise InputError(f"the initial mask has shape {list(mask.shape)}; the image has {list(self.shape)}")
        obj = self._object(oid)
        obj.pending.clear()
        return self._commit(obj, mask != 0, [Interaction("initial", True)])

    def predict(self, oid: int) -> tuple[bool, Box | None]:
        """Run the interactions added with ``run=False``: (anything ran, changed bbox)."""
        obj = self._object(oid)
        if not obj.pending:
            return False, None
        return True, self._run(obj)

    def undo(self, oid: int) -> tuple[bool, Box | None]:
        """Restore the object as before its last step: (anything undone, changed bbox)."""
        obj = self._object(oid)
        if not obj.history:
            return False, None
        step = obj.history.pop()
        obj.interactions = step.interactions
        if step.bbox is None:
            return True, None
        region = obj.mask[_slicer(step.bbox)]
        old = np.unpackbits(step.before, count=int(np.prod(step.shape))).reshape(step.shape).astype(bool)
        box = changed_bbox(region, old)
        region[...] = old
        if box is None:
            return True, None
        return True, [[a + lo, b + lo] for (a, b), (lo, _) in zip(box, step.bbox)]

    def reset(self, oid: int) -> None:
        """Clear the object: empty mask, no interactions, no undo."""
        obj = self._object(oid)
        obj.mask.fill(False)
        obj.interactions.clear()
        obj.history.clear()
        obj.pending.clear()

    # ---------------------------------------------------------------- internals

    def _check_box(self, box: Box) -> Box:
        try:
            b = [[int(round(float(lo))), int(round(float(hi)))] for lo, hi in box]
        except (TypeError, ValueError):
            raise InputError(f"a box is [[lo, hi], [lo, hi], [lo, hi]] of numbers, got {box!r}") from None
        if len(b) != 3:
            raise InputError(f"the box has {len(b)} axes; the image has 3")
        if any(hi <= lo for lo, hi in b):
            raise InputError(f"the box {b} is empty on an axis (hi must be above lo; half-open)")
        clipped = [[max(lo, 0), min(hi, n)] for (lo, hi), n in zip(b, self.shape)]
        if any(hi <= lo for lo, hi in clipped):
            raise InputError(f"the box {b} lies outside the image {list(self.shape)}")
        return clipped

    def _box_axis(self, box: Box) -> int | None:
        """The axis a 2D box lies across (size 1): the image's own flat axis first, else the first one."""
        ones = [k for k, (lo, hi) in enumerate(box) if hi - lo == 1]
        if not ones:
            return None
        flat = [k for k in ones if self.shape[k] == 1]
        return (flat or ones)[0]

    def _queue(self, oid: int, inter: Interaction, run: bool) -> Box | None:
        obj = self._object(oid)
        obj.pending.append(inter)
        return self._run(obj) if run else None

    def _run(self, obj: SegObject) -> Box | None:
        """Apply the pending interactions in order, as one undoable step (nothing changes if one fails)."""
        new, done = obj.mask.copy(), list(obj.interactions)
        try:
            for inter in obj.pending:
                if inter.kind == "point":
                    new = self._click(done, inter, new)
                else:
                    region, anchor = self._segment(inter)
                    if inter.include:
                        new |= region
                        inter.anchor, inter.region = anchor, Bits.of(region)
                    else:
                        new &= ~region
                done.append(inter)
        finally:
            obj.pending = []
        return self._commit(obj, new, done)

    def _commit(self, obj: SegObject, new: np.ndarray, interactions: list[Interaction]) -> Box | None:
        """The object becomes ``new`` with ``interactions``: one undo step, even when no voxel changed."""
        box = changed_bbox(obj.mask, new)
        added = [i for i in interactions if not any(i is j for j in obj.interactions)]
        extra = sum(i.region.packed.nbytes for i in added if i.region is not None)
        if box is None:
            obj.history.append(Step(None, np.zeros(0, np.uint8), (0,), obj.interactions, extra))
        else:
            before = obj.mask[_slicer(box)]
            obj.history.append(Step(box, np.packbits(before, axis=None), before.shape, obj.interactions, extra))
            obj.mask[_slicer(box)] = new[_slicer(box)]
        obj.interactions = interactions
        while obj.history and sum(s.nbytes for s in obj.history) > self.undo_bytes:
            obj.history.pop(0)
        return box

    def _click(self, done: list[Interaction], inter: Interaction, mask: np.ndarray) -> np.ndarray:
        """The object's mask after a click (``done``: its interactions so far, oldest first): the last
        anchor's box and its clicks since, through :meth:`Segmenter.refine_volume`; the anchor's previous
        region replaced by the result."""
        at = next((i for i in range(len(done) - 1, -1, -1) if done[i].anchor is not None), None)
        if at is None:
            if not inter.include:
                raise InputError("a background click needs an object to refine: draw a box or click on the "
                                 "object first")
            axis = next((k for k in range(3) if self.shape[k] == 1), 0)  # a 2D image: its own plane
            z, y, x = (inter.point[k] for k in [axis] + [k for k in range(3) if k != axis])
            inter.anchor = Anchor(axis, (x, y, z, x + 1, y + 1, z), z)
            chain, old = [inter], np.zeros(self.shape, bool)
        else:
            chain = [i for i in done[at:] if i.kind == "point"] + [inter]
            old = next(i.region for i in reversed(done[at:]) if i.region is not None).unpack(self.shape)
        anchor = inter.anchor if at is None else done[at].anchor
        order = [anchor.axis] + [k for k in range(3) if k != anchor.axis]
        points = [[c.point[order[2]], c.point[order[1]], c.point[order[0]]] for c in chain]  # x, y, z
        labels = [1 if c.include else 0 for c in chain]
        prev = mask.transpose(order).astype(np.uint8)
        cache = _AxisCache(self._shared_cache(), anchor.axis)
        vol = np.ascontiguousarray(self.volume.transpose(order))
        out = self._locked(lambda: self.segmenter.refine_volume(
            vol, np.array([anchor.box]), self.modality, points=np.array([points]), point_labels=np.array([labels]),
            prev=prev, cache=cache, starts=[anchor.start]))
        region = (out == 1).transpose(np.argsort(order))
        inter.region = Bits.of(region)
        return (mask & ~old) | region

    def _segment(self, inter: Interaction) -> tuple[np.ndarray, Anchor]:
        """(A0, A1, A2) bool: what the model segments for one box interaction, and the box as a click's
        anchor (a 2D box: over the slices its walk reached)."""
        box = inter.box
        axis = self._box_axis(box) if inter.kind != "bbox3d" else 0
        order = [axis] + [k for k in range(3) if k != axis]
        (s0, s1), (y0, y1), (x0, x1) = (box[k] for k in order)
        # Pixel boxes are max-inclusive (x0, y0, x1, y1) on a slice of the axis.
        xy = np.array([x0, y0, x1 - 1, y1 - 1], np.float64)
        if inter.kind == "bbox3d":  # a MCP-MedSAM 3D box: from its middle slice over its extent
            mid = (s0 + s1 - 1) // 2
            out = self._locked(lambda: self._walk(0, mid, xy, lo=s0, hi=s1 - 1, stop_empty=False))
            anchor = Anchor(0, (x0, y0, s0, x1 - 1, y1 - 1, s1 - 1), mid)
        else:
            out = self._locked(lambda: self._walk(axis, s0, xy))
            reached = np.flatnonzero(out.any(axis=(1, 2)))
            lo, hi = (int(reached[0]), int(reached[-1])) if len(reached) else (s0, s0)
            anchor = Anchor(axis, (x0, y0, lo, x1 - 1, y1 - 1, hi), s0)
        return out.transpose(np.argsort(order)), anchor

    def _locked(self, fn):
        if self.lock is None:
            return fn()
        with self.lock:
            return fn()

    def _shared_cache(self) -> EmbeddingCache:
        if self.cache is None:
            self.cache = self.segmenter.slice_cache(min(self.cache_slices, sum(self.shape)))
        return self.cache

    def _walk(self, axis: int, start: int, box: np.ndarray, *, lo: int = 0, hi: int | None = None,
              stop_empty: bool = True) -> np.ndarray:
        """Segment slice ``start`` of ``axis`` with ``box`` (x0, y0, x1, y1 max-inclusive) and walk up and down
        to ``lo..hi`` -> (N, H, W) bool in the axis-first order. The steps, batches and prompts of
        :meth:`Segmenter.segment_volume` (one shared, bounded embedding cache for every axis); stop_empty: a
        walk ends after an empty mask (segment_volume instead goes on with the given box)."""
        seg, m = self.segmenter, self.segmenter.manifest
        n = self.shape[axis]
        h, w = (self.shape[k] for k in range(3) if k != axis)
        size, margin = m.image_size, m.propagation_margin
        new_hw = preprocess.resized_shape(h, w, size)
        checked = prompts.check_boxes(box[None], (w, h))[0]
        cache, source = self._shared_cache(), _Slices(self.volume)
        out = np.zeros((n, h, w), bool)
        pending = [Walk(1, checked, int(start), lo, n - 1 if hi is None else hi)]
        while pending:
            batch, pending = pending[: seg.max_batch], pending[seg.max_batch:]
            keys = [(axis, wk.z) for wk in batch]
            seg._ensure_encoded(source, keys, cache, new_hw)
            crop_boxes, grid = [], []
            for wk in batch:
                if wk.prev is not None and wk.prev.any():
                    cb, g = prompts.propagated_prompt(wk.prev, new_hw, size, margin)
                else:
                    cb, g = wk.box, prompts.box_to_grid(wk.box, h, w, size)
                crop_boxes.append(cb)
                grid.append(g)
            pieces = [seg._content(source[key], np.asarray(cb)[None]) for key, cb in zip(keys, crop_boxes)]
            crops = np.concatenate([c for c, _ in pieces])
            feats = None if pieces[0][1] is None else np.concatenate([f for _, f in pieces])
            index = np.array([cache.slot(key) for key in keys], np.int64)
            logits, _ = seg._decode_logits(cache.array, index, np.stack(grid), crops, feats, self.row)
            for wk, lg in zip(batch, logits):
                mask = preprocess.postprocess_logits(lg, new_hw, (h, w))
                out[wk.z] = mask
                if mask.any() or not stop_empty:  # without a z range the object ends where its mask does
                    pending.extend(wk.following(mask))
        return out
