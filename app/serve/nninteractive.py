"""nnInteractive's remote-session protocol under ``/nninteractive``: napari-nninteractive and
SlicerNNInteractive (Remote / client-only mode) drive MCP-MedSAM through it.

The contract is the one the PyPI client ``nninteractive-client`` speaks (lease per client in
``X-Lease-Token``, JSON metadata in ``X-Meta``, arrays as a chunked blosc2 body); this is an
implementation of it around :class:`~mcp_medsam.interactive.session.InteractiveSession`: the same
process, model, engine lock, bearer token and size limits as ``/v1``. One lease = one session = one
image and the object being drawn (its mask is the client's target buffer). What the model does with
each interaction is said in :mod:`mcp_medsam.interactive.session`.

Bodies are checked before they are decompressed in full: the header's dtype, rank and shape, the
size the shape implies against ``--max-image-mb``, and every chunk's declared sizes against the
blosc2 frame header and the body's length; anything wrong is a 4xx JSON answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from ..errors import InputError, TooLarge
from ..interactive.session import InteractiveSession
from ..segmenter import Segmenter
from .config import MB, ServeConfig

PREFIX = "/nninteractive"
META = "X-Meta"
LEASE = "X-Lease-Token"
OCTET = "application/octet-stream"
# Paths whose bodies are arrays (allowed up to --max-upload-mb by the app's body limit).
ARRAY_PATHS = tuple(PREFIX + p for p in ("/set_image", "/add_scribble_interaction", "/add_lasso_interaction",
                                         "/add_initial_seg_interaction"))
MAGIC, VERSION = b"NNIA", 1
CODECS = {1: "zstd", 2: "lz4"}
IMAGE_KINDS = "iuf"  # integers and floats (native intensities)
MASK_KINDS = "biu"  # bool and integers (masks)
VERSION_STRING = "mcp-medsam-1"
log = logging.getLogger("mcp_medsam.serve")


def _blosc2():
    import blosc2

    return blosc2


# ---------------------------------------------------------------- wire format


@dataclass(frozen=True)
class Packed:
    """A parsed array body: dtype, shape and the (offset, ulen, clen) of each compressed chunk."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: list[tuple[int, int, int]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_packed(body: bytes, *, kinds: str, ndim: int, max_bytes: int) -> Packed:
    """Read and check a packed array's header and chunk table; nothing is decompressed.

    Raises InputError (422) for a malformed body, a dtype not of ``kinds``, another rank than
    ``ndim``, or chunks whose declared sizes disagree with each other, the shape or the body; TooLarge
    (413) when the shape's bytes exceed ``max_bytes``."""
    def bad(why: str) -> InputError:
        return InputError(f"the array body is not a valid packed array: {why}")

    if len(body) < 8:
        raise bad(f"{len(body)} bytes")
    magic, version, codec, rank, name_len = struct.unpack_from("<4sBBBB", body, 0)
    if magic != MAGIC or version != VERSION:
        raise bad("wrong magic or version (expected nnInteractive's NNIA version 1)")
    if codec not in CODECS:
        raise bad(f"unknown codec id {codec}")
    pos = 8 + name_len
    if len(body) < pos + 8 * rank + 4:
        raise bad("truncated header")
    try:
        dtype = np.dtype(body[8:pos].decode("ascii"))
    except (UnicodeDecodeError, TypeError, ValueError):
        raise bad("unknown dtype") from None
    shape = struct.unpack_from(f"<{rank}q", body, pos)
    pos += 8 * rank
    if dtype.kind not in kinds or dtype.itemsize > 8 or dtype.byteorder == ">":
        raise InputError(f"dtype {dtype} is not accepted here (expected {_kinds(kinds)})")
    if rank != ndim:
        raise InputError(f"the array has {rank} axes {list(shape)}; expected {ndim}")
    if any(n <= 0 for n in shape):
        raise InputError(f"the array shape {list(shape)} has an empty or negative axis")
    total = int(np.prod(np.array(shape, dtype=object)))  * dtype.itemsize  # Python ints: no overflow
    if total > max_bytes:
        raise TooLarge(f"the array {list(shape)} {dtype} needs {total / MB:.4g} MB; this server takes at most "
                       f"{max_bytes / MB:.4g} MB (--max-image-mb)")
    (nchunks,) = struct.unpack_from("<I", body, pos)
    pos += 4
    chunks, declared = [], 0
    blosc2 = _blosc2()
    for i in range(nchunks):
        if len(body) < pos + 16:
            raise bad(f"chunk {i} header is cut off")
        ulen, clen = struct.unpack_from("<QQ", body, pos)
        pos += 16
        if clen > len(body) - pos or clen < 16:
            raise bad(f"chunk {i} claims {clen} compressed bytes; the body has {len(body) - pos} left")
        declared += ulen
        if declared > total or ulen % dtype.itemsize:
            raise bad(f"chunk {i} claims {ulen} bytes; the shape holds {total}")
        try:
            nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(body[pos:pos + min(clen, 32)])
        except Exception:  # noqa: BLE001 - blosc2 raises several types for a garbled frame header
            raise bad(f"chunk {i} is not a blosc2 frame") from None
        if nbytes != ulen or cbytes != clen:
            raise bad(f"chunk {i}: the table says {ulen}/{clen} bytes, its frame says {nbytes}/{cbytes}")
        chunks.append((pos, ulen, clen))
        pos += clen
    if declared != total:
        raise bad(f"the chunks hold {declared} bytes; the shape {list(shape)} {dtype} needs {total}")
    if pos != len(body):
        raise bad(f"{len(body) - pos} bytes after the last chunk")
    return Packed(dtype=dtype, shape=tuple(int(n) for n in shape), chunks=chunks)


def _kinds(kinds: str) -> str:
    return ", ".join({"b": "bool", "i": "signed integers", "u": "unsigned integers", "f": "floats"}[k] for k in kinds)


def unpack(body: bytes, packed: Packed) -> np.ndarray:
    """Decompress a checked body chunk by chunk straight into the output array."""
    blosc2 = _blosc2()
    out = np.empty(int(np.prod(packed.shape)), packed.dtype)
    raw = out.view(np.uint8)
    mv, done = memoryview(body), 0
    for pos, ulen, clen in packed.chunks:
        try:
            blosc2.decompress2(mv[pos:pos + clen], dst=raw[done:done + ulen])
        except Exception:  # noqa: BLE001
            raise InputError("the array body does not decompress (corrupt blosc2 data)") from None
        done += ulen
    return out.reshape(packed.shape)


def pack(arr: np.ndarray) -> bytes:
    """An array in the protocol's packed form (one zstd chunk per GiB, no filter: masks compress best so)."""
    blosc2 = _blosc2()
    arr = np.ascontiguousarray(arr)
    name = arr.dtype.name.encode("ascii")
    raw = memoryview(arr).cast("B")
    step = 1 << 30
    parts = [struct.pack(f"<4sBBBB{len(name)}s", MAGIC, VERSION, 1, arr.ndim, len(name), name),
             struct.pack(f"<{arr.ndim}q", *arr.shape), struct.pack("<I", (raw.nbytes + step - 1) // step)]
    for start in range(0, raw.nbytes, step):
        piece = raw[start:start + step]
        c = blosc2.compress2(piece, typesize=arr.dtype.itemsize, codec=blosc2.Codec.ZSTD, clevel=3,
                             filters=[blosc2.Filter.NOFILTER])
        parts += [struct.pack("<QQ", piece.nbytes, len(c)), c]
    return b"".join(parts)


# ---------------------------------------------------------------- leases


@dataclass
class Lease:
    """One client's session and clocks: ``active`` (real actions: the idle timeout) and ``seen``
    (anything, heartbeats too: the liveness timeout)."""

    token: str
    session: Optional[InteractiveSession] = None
    obj: Optional[int] = None
    target: Optional[tuple[tuple[int, ...], np.dtype]] = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.obj = self.target = None


class Leases:
    """The sessions of the protocol, by lease token. Thread-safe."""

    def __init__(self, *, max_sessions: int, idle_s: float, liveness_s: float) -> None:
        self.max_sessions, self.idle_s, self.liveness_s = max_sessions, idle_s, liveness_s
        self._by_token: dict[str, Lease] = {}
        self._mu = threading.Lock()

    def __len__(self) -> int:
        with self._mu:
            return len(self._by_token)

    def claim(self) -> Lease:
        self.sweep()
        with self._mu:
            if len(self._by_token) >= self.max_sessions:
                raise HTTPException(503, f"server is at capacity ({self.max_sessions} sessions; --sessions)",
                                    headers={"Retry-After": "10"})
            lease = Lease(secrets.token_hex(16))
            self._by_token[lease.token] = lease
        log.info("nninteractive: claimed session %s… (%d/%d)", lease.token[:6], len(self), self.max_sessions)
        return lease

    def get(self, token: Optional[str], *, seen: bool = True) -> Lease:
        self.sweep()
        with self._mu:
            lease = self._by_token.get(token or "")
        if lease is None:
            raise HTTPException(410, "lease expired or unknown" if token else "lease token missing")
        if seen:
            lease.seen = time.monotonic()
        return lease

    def release(self, token: Optional[str]) -> bool:
        with self._mu:
            lease = self._by_token.pop(token or "", None)
        if lease is None:
            return False
        with lease.lock:
            lease.close()
        log.info("nninteractive: released session %s…", lease.token[:6])
        return True

    def remaining(self, lease: Lease) -> float:
        return max(0.0, self.idle_s - (time.monotonic() - lease.active))

    def sweep(self) -> int:
        """Drop leases idle past the idle timeout or silent past the liveness timeout; free them."""
        now = time.monotonic()
        with self._mu:
            # A lease busy in a request (its lock held) is alive, however long the model takes.
            gone = [(t, lz, "dead" if now - lz.seen > self.liveness_s else "idle")
                    for t, lz in self._by_token.items() if not lz.lock.locked() and
                    (now - lz.seen > self.liveness_s or now - lz.active > self.idle_s)]
            for t, _, _ in gone:
                del self._by_token[t]
        for _, lease, why in gone:
            with lease.lock:
                lease.close()
            log.info("nninteractive: reaped %s session %s…", why, lease.token[:6])
        return len(gone)

    def close_all(self) -> None:
        with self._mu:
            leases, self._by_token = list(self._by_token.values()), {}
        for lease in leases:
            lease.close()


# ---------------------------------------------------------------- the router


def _meta(request: Request) -> dict[str, Any]:
    raw = request.headers.get(META)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"bad {META} header: {exc}") from None
    if not isinstance(meta, dict):
        raise HTTPException(400, f"the {META} header must be a JSON object")
    return meta


def _flag(payload: dict, key: str, default: Optional[bool] = None) -> bool:
    value = payload.get(key, default)
    if not isinstance(value, bool):
        raise HTTPException(422, f"{key} must be true or false" if key in payload else f"missing field: {key}")
    return value


def _box(raw: Any, what: str) -> list[list[float]]:
    if (not isinstance(raw, list) or len(raw) != 3 or
            not all(isinstance(b, list) and len(b) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in b) for b in raw)):
        raise HTTPException(422, f"{what} must be [[lo, hi], [lo, hi], [lo, hi]] (half-open, per axis)")
    return raw


def capabilities(segmenter: Segmenter) -> dict[str, Any]:
    """What this server's model does with nnInteractive's interactions (no claim needed to ask)."""
    m = segmenter.manifest
    return {
        # points: clicks refine the object's last box (mcp_medsam.interactive.session), for models that take them.
        "supported_interactions": {"points": segmenter.supports_points, "bbox2d": True, "bbox3d": True,
                                   "scribble": False, "lasso": True},
        # MCP-MedSAM has no interaction channels (boxes are prompt tokens, no mask input): nothing to map.
        "channel_mapping": {},
        "num_interaction_channels": 0,
        "supports_initial_label": False,
        "supports_zero_shot_label_refinement": False,
        "preferred_scribble_thickness": [1, 1, 1],
        "interaction_decay": None,
        "patch_size": [m.image_size, m.image_size],
        "do_autozoom": False,
        "inference_session_version": VERSION_STRING,
        "license": license_of(segmenter),
        "supports_undo": True,
    }


def license_of(segmenter: Segmenter) -> str:
    """One line naming the weights' provenance as their manifest records it."""
    m = segmenter.manifest
    raw = m.raw
    prov = raw.get("provenance") or {}
    init = prov.get("init", "") if isinstance(prov, dict) else ""
    desc = raw.get("description") or raw.get("name", "MCP-MedSAM")
    text = f"{desc}" + (f"; initialised from {init}" if init else "")
    return text + "; weights of the mcp-medsam appliance (see its README for the licence of each source)"


def router(*, segmenter: Segmenter, config: ServeConfig, engine_lock: threading.Lock, auth: Any) -> APIRouter:
    """The protocol's endpoints, mounted by :func:`mcp_medsam.serve.app.create_app` at ``/nninteractive``."""
    leases = Leases(max_sessions=config.sessions, idle_s=config.session_idle_s, liveness_s=config.session_liveness_s)
    m = segmenter.manifest
    slot = m.embed_dim * m.embedding_size * m.embedding_size * 4
    cache_slices = max(int(config.cache_bytes // config.sessions // slot), 1)
    caps = capabilities(segmenter)
    if config.modality:
        segmenter.modality_row(config.modality)  # UnknownModality names the accepted ones

    @asynccontextmanager
    async def lifespan(_app: Any):
        async def reaper() -> None:
            period = min(15.0, max(0.05, min(leases.idle_s, leases.liveness_s) / 4))
            while True:
                await asyncio.sleep(period)
                leases.sweep()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            leases.close_all()

    api = APIRouter(prefix=PREFIX, tags=["nninteractive"], lifespan=lifespan)
    api.leases = leases  # for tests and the service's own accounting
    guarded = [Depends(auth)]

    def lease_of(x_lease_token: Optional[str] = Header(None, alias=LEASE)) -> Lease:
        return leases.get(x_lease_token)

    def active(lease: Lease) -> Lease:
        lease.active = lease.seen = time.monotonic()
        return lease

    @contextmanager
    def acting(lease: Lease):
        """A user action on a lease: its lock held, its clocks set at the start and again at the end (a
        prediction longer than the idle timeout must not leave it reaped the moment it answers)."""
        with lease.lock:
            active(lease)
            try:
                yield
            finally:
                active(lease)

    def with_session(lease: Lease) -> tuple[InteractiveSession, int]:
        if lease.session is None:
            raise HTTPException(409, "no image in this session: call set_image first")
        if lease.obj is None:
            raise HTTPException(409, "no target buffer in this session: call set_target_buffer first")
        return lease.session, lease.obj

    def answer(lease: Lease, ran: bool, bbox: Optional[list[list[int]]]) -> Response:
        """The changed part of the target buffer and its bbox (half-open, per axis) in X-Meta."""
        if not ran or bbox is None or lease.target is None:
            meta = {"ran_prediction": bool(ran), "bbox": None}
            return Response(b"", media_type=OCTET, headers={META: json.dumps(meta)})
        sub = lease.session.mask(lease.obj)[tuple(slice(lo, hi) for lo, hi in bbox)].astype(lease.target[1])
        meta = {"ran_prediction": True, "bbox": bbox, "dtype": sub.dtype.name, "shape": list(sub.shape)}
        return Response(pack(sub), media_type=OCTET, headers={META: json.dumps(meta, separators=(",", ":"))})

    @api.get("/healthz", summary="Liveness of the protocol and the sessions held (no token needed)")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "sessions": len(leases), "max_sessions": leases.max_sessions}

    @api.get("/capabilities", dependencies=guarded, summary="What the model does with each interaction")
    def get_capabilities() -> dict[str, Any]:
        return caps

    @api.post("/claim", dependencies=guarded, summary="A lease on a session (503 at --sessions)")
    def claim() -> dict[str, Any]:
        lease = leases.claim()
        return {"lease_token": lease.token, "idle_timeout_seconds": leases.idle_s,
                "liveness_timeout_seconds": leases.liveness_s, "max_sessions": leases.max_sessions}

    @api.post("/release", dependencies=guarded, summary="Free a session and everything it holds")
    def release(x_lease_token: Optional[str] = Header(None, alias=LEASE)) -> dict[str, Any]:
        leases.release(x_lease_token)
        return {"released": True}

    @api.post("/heartbeat", dependencies=guarded, summary="The client is alive (does not postpone the idle timeout)")
    def heartbeat(lease: Lease = Depends(lease_of)) -> dict[str, Any]:
        return {"remaining_seconds": leases.remaining(lease)}

    @api.get("/lease_status", dependencies=guarded, summary="Seconds left before the idle timeout")
    def lease_status(x_lease_token: Optional[str] = Header(None, alias=LEASE)) -> dict[str, Any]:
        lease = leases.get(x_lease_token, seen=False)
        return {"remaining_seconds": leases.remaining(lease), "idle_timeout_seconds": leases.idle_s}

    @api.post("/set_image", dependencies=guarded, summary="The image: [C=1, A0, A1, A2] packed array body")
    async def set_image(request: Request, lease: Lease = Depends(lease_of)) -> dict[str, Any]:
        _meta(request)
        body = await request.body()

        def work() -> dict[str, Any]:
            packed = parse_packed(body, kinds=IMAGE_KINDS, ndim=4, max_bytes=config.max_image_bytes)
            if packed.shape[0] != 1:
                raise InputError(f"the image has {packed.shape[0]} channels; MCP-MedSAM takes one ([1, A0, A1, A2])")
            raw = unpack(body, packed)[0]
            with acting(lease):
                lease.close()
                session = InteractiveSession.from_native(segmenter=segmenter, raw=raw, modality=config.modality,
                                                         cache_slices=cache_slices, engine_lock=engine_lock)
                lease.session = session
            log.info("nninteractive: session %s… image %s %s, modality %s (%s)", lease.token[:6],
                     "x".join(map(str, raw.shape)), raw.dtype, session.modality,
                     "guessed: values below -500 are CT, else MR" if session.guessed else "--modality")
            return {"original_image_shape": list(packed.shape)}

        return await run_in_threadpool(work)

    @api.post("/set_target_buffer", dependencies=guarded, summary="Start a new object in a buffer of this shape")
    def set_target_buffer(payload: dict, lease: Lease = Depends(lease_of)) -> dict[str, Any]:
        shape, name = payload.get("shape"), payload.get("dtype")
        with acting(lease):
            if lease.session is None:
                raise HTTPException(409, "no image in this session: call set_image first")
            if not isinstance(shape, list) or shape != list(lease.session.shape) or \
                    not all(type(n) is int for n in shape):
                raise HTTPException(422, f"shape {shape!r} must be the image's {list(lease.session.shape)}")
            try:
                dtype = np.dtype(name)
            except (TypeError, ValueError):
                raise HTTPException(422, f"dtype {name!r} is not a numpy dtype") from None
            if dtype.kind not in MASK_KINDS:
                raise HTTPException(422, f"dtype {dtype}: a target buffer is bool or integers")
            if lease.obj is not None:
                lease.session.drop_object(lease.obj)
            lease.obj, lease.target = lease.session.new_object(), (tuple(shape), dtype)
        return {}

    @api.post("/set_do_autozoom", dependencies=guarded, summary="Accepted and ignored (no zoom in MCP-MedSAM)")
    def set_do_autozoom(payload: dict, lease: Lease = Depends(lease_of)) -> dict[str, Any]:
        _flag(payload, "do_autozoom")
        active(lease)
        return {}

    @api.post("/reset_interactions", dependencies=guarded, summary="Clear the object and its interactions")
    def reset_interactions(lease: Lease = Depends(lease_of)) -> dict[str, Any]:
        with acting(lease):
            if lease.session is not None and lease.obj is not None:
                lease.session.reset(lease.obj)
        return {}

    @api.post("/undo", dependencies=guarded, summary="Undo the last step of the object")
    def undo(lease: Lease = Depends(lease_of)) -> Response:
        with acting(lease):
            session, obj = with_session(lease)
            ran, bbox = session.undo(obj)
            return answer(lease, ran, bbox)

    @api.post("/predict", dependencies=guarded, summary="Run the interactions added with run_prediction false")
    def predict(payload: dict, lease: Lease = Depends(lease_of)) -> Response:
        with acting(lease):
            session, obj = with_session(lease)
            ran, bbox = session.predict(obj)
            return answer(lease, ran, bbox)

    @api.post("/add_bbox_interaction", dependencies=guarded, summary="A 2D box (one axis of size 1) or a 3D box")
    def add_bbox(payload: dict, lease: Lease = Depends(lease_of)) -> Response:
        box = _box(payload.get("bbox_coords"), "bbox_coords")
        include, run = _flag(payload, "include_interaction"), _flag(payload, "run_prediction", True)
        with acting(lease):
            session, obj = with_session(lease)
            bbox = session.add_box(obj, box, include=include, run=run)
            return answer(lease, run, bbox)

    @api.post("/add_point_interaction", dependencies=guarded,
              summary="A click refining the object's last box (models with point prompts; else 400)")
    def add_point(payload: dict, lease: Lease = Depends(lease_of)) -> Response:
        if not segmenter.supports_points:
            raise HTTPException(400, "points are not supported by this server's model (see /capabilities)")
        at = payload.get("coordinates")
        if (not isinstance(at, list) or len(at) != 3 or
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in at)):
            raise HTTPException(422, "coordinates must be [a0, a1, a2] (voxel indices, one per axis)")
        include, run = _flag(payload, "include_interaction"), _flag(payload, "run_prediction", True)
        with acting(lease):
            session, obj = with_session(lease)
            return answer(lease, run, session.add_point(obj, at, include=include, run=run))

    @api.post("/add_scribble_interaction", dependencies=guarded, summary="Not supported by this model (400)")
    async def add_scribble(request: Request, lease: Lease = Depends(lease_of)) -> Response:
        raise HTTPException(400, "scribbles are not supported by this server's model (see /capabilities)")

    async def mask_body(request: Request, lease: Lease) -> tuple[dict[str, Any], bytes]:
        meta = _meta(request)
        return meta, await request.body()

    @api.post("/add_lasso_interaction", dependencies=guarded, summary="A lasso: its bounding box on its slice")
    async def add_lasso(request: Request, lease: Lease = Depends(lease_of)) -> Response:
        meta, body = await mask_body(request, lease)
        include, run = _flag(meta, "include_interaction"), _flag(meta, "run_prediction", True)
        at = meta.get("interaction_bbox")
        at = None if at is None else _box(at, "interaction_bbox")

        def work() -> Response:
            mask = unpack(body, parse_packed(body, kinds=MASK_KINDS, ndim=3, max_bytes=config.max_image_bytes))
            with acting(lease):
                session, obj = with_session(lease)
                return answer(lease, run, session.add_lasso(obj, mask, at=at, include=include, run=run))

        return await run_in_threadpool(work)

    @api.post("/add_initial_seg_interaction", dependencies=guarded,
              summary="Start the object from a mask (kept as is: the model takes no mask; later boxes add or cut)")
    async def add_initial_seg(request: Request, lease: Lease = Depends(lease_of)) -> Response:
        meta, body = await mask_body(request, lease)

        def work() -> Response:
            mask = unpack(body, parse_packed(body, kinds=MASK_KINDS, ndim=3, max_bytes=config.max_image_bytes))
            with acting(lease):
                session, obj = with_session(lease)
                bbox = session.set_initial(obj, mask)
                return answer(lease, bool(meta.get("run_prediction", False)), bbox)

        return await run_in_threadpool(work)

    return api
