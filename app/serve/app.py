"""The FastAPI app: upload an image once, then segment any number of box sets on it.

One :class:`~mcp_medsam.Segmenter` per process. Its calls run in the thread pool (so health checks,
progress polls and uploads stay responsive) and one lock serialises them: OpenVINO infer requests
are not thread-safe, and a second request waits instead of sharing one. Errors are JSON
``{"detail": "<one line>"}`` with a 4xx status for anything wrong with the request.

Endpoints (``/docs`` lists them with their schemas): ``POST /v1/images``, ``GET|DELETE
/v1/images/{id}``, ``POST /v1/images/{id}/segment``, ``GET /v1/images/{id}/labels``, ``GET
/v1/images/{id}/progress``, ``GET /v1/images/{id}/slices/{z}``, ``GET /v1/info``, ``GET /healthz``,
and the web page at ``/``.
"""

from __future__ import annotations

import hmac
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__, prompts
from ..errors import InputError, SegmentationError, TooLarge
from ..modality import accepted_token
from ..segmenter import Segmenter
from . import nninteractive, results, uploads
from .config import MB, ServeConfig, ServeError
from .guards import (AccessLogFilter, BodyTimeout, HostOriginGuard, ShutdownGuard, receive_within, short_id,
                     shorten_ids)
from .store import ImageStore, Progress, StoreBusy, StoredImage, StoreFull

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD_PATH = "/v1/images"
JSON_BODY_BYTES = 1 * MB
# The page loads only its own files; blob: for slice pictures fetched with the token.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                           "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}
log = logging.getLogger("mcp_medsam.serve")


class SegmentRequest(BaseModel):
    """Boxes are pixel indices, max inclusive, x = column, y = row, z = slice; partly outside: clipped."""

    model_config = ConfigDict(extra="forbid")
    boxes: list[list[float]] = Field(
        description="2D: [[x0, y0, x1, y1], ...]; 3D: [[x0, y0, z0, x1, y1, z1], ...] (each box propagated "
                    "from its middle slice over z0..z1). Label i+1 = box i; later boxes overwrite earlier ones.",
        examples=[[[150, 80, 290, 220]]])
    modality: Optional[str] = Field(None, description="Default: the modality given at upload.", examples=["CT"])
    points: Optional[list[list[list[float]]]] = Field(
        None, description="Clicks per box, oldest first (models with point prompts): 2D [[[x, y], ...], ...], 3D "
                          "[[[x, y, z], ...], ...]; a 3D box is re-propagated from its newest click's slice.")
    point_labels: Optional[list[list[float]]] = Field(
        None, description="Per box, per click: 1 foreground, 0 background (with points).")


class ImageOut(BaseModel):
    id: str = Field(description="Unguessable id of the upload: every other call names it.")
    shape: list[int] = Field(description="[H, W] for a 2D image, [D, H, W] for a volume (z, y, x; a single .dcm "
                                         "file is a volume of depth 1).")
    spacing: Optional[list[float]] = Field(description="mm per pixel in the order of shape: (z, y, x) for a volume, "
                                           "(y, x) for 2D, as NPZ cases store it (SimpleITK lists it x first); "
                                           "null where the file has none.")
    modality: Optional[str]
    dims: int = Field(description="2 or 3.")
    format: str = Field(description="The upload's file format (its suffix).")
    name: str = Field(description="Base name used for result downloads.")
    boxes: Optional[list[list[int]]] = Field(None, description="An NPZ case's own boxes (else null).")


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "The image or volume: " + ", ".join(sorted(uploads.suffixes())) +
                                " (chosen by the file name's suffix)."},
        "modality": {"type": "string", "description": "The default modality of its segment calls; for a native "
                     "volume also what converts its intensities (CT: window L40/W400 HU; others: percentiles)."},
        "window": {"type": "string", "description": "Optional LEVEL,WIDTH (e.g. 40,400): clip native values to "
                   "this window instead of the modality's rule."},
        "series": {"type": "string", "description": "SeriesInstanceUID, for a .zip holding several DICOM series."}}}}}}}
LABEL_CONTENT = {results.PNG: {}, results.JSON: {}, results.NPZ: {}, results.NIFTI: {}}


class BodyLimit:
    """Caps request bodies (413): uploads at ``upload_bytes``, every other body at 1 MB. The announced
    Content-Length is checked before anything is read, then the bytes as they arrive (chunked too).
    A body that goes ``body_timeout`` seconds without a byte is dropped (408, connection closed)."""

    def __init__(self, app: Any, *, upload_bytes: int, body_timeout: float = 30.0) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") in (UPLOAD_PATH, *nninteractive.ARRAY_PATHS)
        limit = self.upload_bytes if is_upload else JSON_BODY_BYTES
        message = (f"the upload is larger than {limit / MB:.4g} MB (--max-upload-mb)" if is_upload
                   else f"the request body is larger than {limit / MB:.4g} MB")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        seen, more = 0, True

        async def limited() -> dict:
            nonlocal seen, more
            try:  # only while the body is arriving: afterwards receive() waits for a disconnect
                msg = await (receive_within(receive, self.body_timeout) if more else receive())
            except BodyTimeout as exc:
                raise HTTPException(408, str(exc), headers={"Connection": "close"}) from None
            if msg["type"] == "http.request":
                more = bool(msg.get("more_body", False))
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        elif not loc:  # no body, or not a JSON object (e.g. sent without Content-Type: application/json)
            parts.append('a JSON object body is needed (Content-Type: application/json), e.g. '
                         '{"boxes": [[x0, y0, x1, y1]], "modality": "CT"}')
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def create_app(*, segmenter: Segmenter, config: ServeConfig) -> FastAPI:
    """The service around one loaded model. Raises ServeError for settings it cannot run with."""
    config.check()
    m = segmenter.manifest
    slot = m.embed_dim * m.embedding_size * m.embedding_size * 4
    least = 2 * segmenter.max_batch * slot
    if config.cache_bytes < least:
        raise ServeError(f"--cache-mb must be at least {least / MB:g} (two decoder batches of slice embeddings)")
    store = ImageStore(max_images=config.max_images, cache_bytes=config.cache_bytes, temp_dir=config.temp_dir)
    if store.removed_stale:
        log.warning("removed %d upload folder(s) left by killed servers: %s", len(store.removed_stale),
                    ", ".join(p.name for p in store.removed_stale))
    model = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        access, shorten = logging.getLogger("uvicorn.access"), AccessLogFilter()
        access.addFilter(shorten)
        try:
            yield
        finally:
            access.removeFilter(shorten)
            store.close()

    app = FastAPI(title="mcp-medsam", version=__version__, lifespan=lifespan,
                  description="MCP-MedSAM box-prompted segmentation: upload an image or volume once, then "
                              "segment boxes on it. Send `Authorization: Bearer <token>` when the server has one.")
    app.state.store = store
    app.state.segmenter = segmenter
    app.state.config = config
    app.add_middleware(BodyLimit, upload_bytes=config.max_upload_bytes, body_timeout=config.body_timeout)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["Content-Disposition", "X-IoU"])
    if config.token is None:  # the loopback default: no foreign Host (DNS rebinding), no foreign Origin
        app.add_middleware(HostOriginGuard, allowed=(config.host, *config.allowed_hosts), cors=config.cors_origins)
    app.add_middleware(ShutdownGuard)  # outermost

    bearer = HTTPBearer(auto_error=False, description="The server's --token (or $MCP_MEDSAM_TOKEN).")

    def authorised(cred: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if config.token is None:
            return
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), config.token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413 if isinstance(exc, TooLarge) else
                            getattr(exc, "status", 422))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s %s from %s: the client disconnected before the request was complete", request.method,
                 shorten_ids(request.url.path), client)
        return Response(status_code=400)  # nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(SegmentationError)
    async def _model_error(request: Request, exc: SegmentationError) -> JSONResponse:
        log.error("model error: %s", exc)
        return JSONResponse({"detail": f"model error: {exc}"}, status_code=500)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (the server log has the details)"}, status_code=500)

    def image_of(image_id: str) -> StoredImage:
        image = store.get(image_id)
        if image is None:
            raise HTTPException(404, "no image with this id (deleted, or never uploaded to this server)")
        return image

    def label_offers(image: StoredImage) -> tuple[str, ...]:
        if not image.is_3d:
            return results.PNG, results.JSON, results.NPZ
        return (results.NPZ, results.JSON) + ((results.NIFTI,) if results.can_write_nifti() else ())

    def answer_kind(image: StoredImage, accept: Optional[str]) -> str:
        offers = label_offers(image)
        kind = results.negotiate(accept, offers)
        if kind is None:
            raise HTTPException(406, f"cannot answer with {accept!r} for a {'volume' if image.is_3d else '2D image'}; "
                                     f"Accept one of {', '.join(offers)}")
        return kind

    def label_response(image: StoredImage, kind: str) -> Response:
        labels, iou = image.labels, image.iou
        headers = {"X-IoU": ",".join(f"{v:.4f}" for v in iou)} if iou else {}
        if kind == results.JSON:
            return JSONResponse(results.labels_json(labels, iou), headers=headers)
        headers["Content-Disposition"] = f'attachment; filename="{image.name}_labels{results.SUFFIX[kind]}"'
        if kind == results.PNG:
            body = results.encode_png(labels)
        elif kind == results.NIFTI:
            body = results.labels_nifti(labels, image.native, image.folder)
        else:
            body = results.labels_npz(labels, image.spacing)
        return Response(body, media_type=kind, headers=headers)

    def load(image_id: str, folder: Path, received: uploads.Received) -> StoredImage:
        """Read the upload and, for a 2D image, embed it (thread pool; the model lock only for the encoder)."""
        modality = (received.fields.get("modality") or uploads.modality_from_name(received.filename)
                    or config.modality or None)
        if modality:
            segmenter.modality_row(modality)  # UnknownModality (422) names the accepted ones
            modality = accepted_token(modality)
        loaded = uploads.read_upload(received.path, filename=received.filename, modality=modality,
                                     window=uploads.parse_window(received.fields.get("window")),
                                     series=received.fields.get("series") or None, max_bytes=config.max_image_bytes)
        image = StoredImage(id=image_id, folder=folder, name=uploads.download_stem(received.filename),
                            source=uploads.upload_suffix(received.filename), array=loaded.array, is_3d=loaded.is_3d,
                            spacing=loaded.spacing, modality=modality, native=loaded.native,
                            boxes=None if loaded.boxes is None else loaded.boxes.tolist())
        if not image.is_3d:
            with model:
                image.embedding = segmenter.embed(image.array)
        return image

    def segment_volume(image: StoredImage, boxes: np.ndarray, modality: str,
                       clicks: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        progress = image.progress = Progress(state="queued", total=int((boxes[:, 5] - boxes[:, 2] + 1).sum()))

        def step(done: int, total: int) -> None:
            progress.done, progress.total = done, total

        try:
            with model:
                progress.state = "running"
                cache = store.slice_cache(image, segmenter)
                if clicks is None:
                    labels = segmenter.segment_volume(image.array, boxes, modality, cache=cache, progress=step)
                else:  # the previous result (same boxes) prompts the newest click's slice
                    prev = image.labels if image.labels is not None and image.labels.shape == image.array.shape \
                        else None
                    labels = segmenter.refine_volume(image.array, boxes, modality, points=clicks[0],
                                                     point_labels=clicks[1], prev=prev, cache=cache, progress=step)
        except BaseException as exc:
            progress.state, progress.message = "failed", str(exc)
            raise
        progress.state = "done"
        return labels

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    @v1.post("/images", status_code=201, response_model=ImageOut, openapi_extra=UPLOAD_BODY,
             summary="Upload an image or a volume (multipart 'file', optional 'modality')")
    async def upload_image(request: Request) -> dict[str, Any]:
        """A 2D image is embedded at once; a volume's slices are embedded when first segmented."""
        try:
            image_id, folder = store.begin_upload()
        except StoreBusy as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        try:
            received = await uploads.receive_upload(request.stream(), request.headers.get("content-type"), folder)
            try:  # a place only once the whole body is here: a stalled client holds none
                store.reserve(image_id)
            except StoreFull as exc:
                raise HTTPException(413, str(exc)) from None
            image = await run_in_threadpool(load, image_id, folder, received)
        except BaseException:
            store.release(image_id)
            raise
        store.add(image)
        log.info("image %s %s %s", short_id(image_id), image.source, "x".join(map(str, image.shape)))
        return image.describe()

    @v1.get("/images/{image_id}", response_model=ImageOut, summary="What an upload is")
    def get_image(image_id: str) -> dict[str, Any]:
        return image_of(image_id).describe()

    @v1.delete("/images/{image_id}", status_code=204, summary="Delete an upload, its file and its embeddings")
    def delete_image(image_id: str) -> Response:
        if not store.delete(image_id):
            raise HTTPException(404, "no image with this id (deleted, or never uploaded to this server)")
        return Response(status_code=204)

    @v1.post("/images/{image_id}/segment", responses={200: {"content": LABEL_CONTENT}}, response_class=Response,
             summary="Segment boxes: the label map (2D: PNG by default; 3D: NPZ by default)")
    def segment(image_id: str, body: SegmentRequest, accept: Optional[str] = Header(None)) -> Response:
        """2D: only the per-box decoder runs (the image was embedded at upload). 3D: each box is
        propagated from its middle slice; poll ``/progress`` meanwhile. Accept: image/png (2D),
        application/json (run-length labels and the predicted IoU), application/x-npz (``segs``)."""
        image = image_of(image_id)
        kind = answer_kind(image, accept)
        width = 6 if image.is_3d else 4
        if len(body.boxes) > config.max_boxes:
            raise HTTPException(422, f"{len(body.boxes)} boxes; this server takes at most {config.max_boxes} "
                                     f"per request (--max-boxes)")
        for i, b in enumerate(body.boxes, start=1):
            if len(b) != width:
                raise InputError(f"box {i} has {len(b)} numbers; a {'volume' if image.is_3d else '2D image'} takes "
                                 f"{'[x0, y0, z0, x1, y1, z1]' if image.is_3d else '[x0, y0, x1, y1]'}")
        modality = body.modality or image.modality
        if not modality:
            raise InputError(f"no modality: give one in the request or at upload (accepted: "
                             f"{', '.join(segmenter.modalities)})")
        segmenter.modality_row(modality)
        h, w = image.array.shape[1:3] if image.is_3d else image.array.shape[:2]
        dims = (w, h, image.array.shape[0]) if image.is_3d else (w, h)
        boxes = prompts.check_boxes(np.asarray(body.boxes, np.float64).reshape(-1, width), dims)
        clicks = None
        if body.points is not None or body.point_labels is not None:
            if body.points is None or body.point_labels is None or len(body.points) != len(boxes) or \
                    [len(p) for p in body.points] != [len(lb) for lb in body.point_labels]:
                raise InputError("points and point_labels go together: one list per box, one label per click")
            if any(len(c) != len(dims) for pts in body.points for c in pts):
                raise InputError(f"each click is {'[x, y, z]' if image.is_3d else '[x, y]'}")
            clicks = prompts.pad_points([np.asarray(p, np.float64) for p in body.points],
                                        [np.asarray(lb, np.float64) for lb in body.point_labels], dim=len(dims))
        if image.is_3d:
            labels, iou = segment_volume(image, boxes, modality, clicks), None
        else:
            with model:
                labels, ious = segmenter.segment_embedding(image.embedding, boxes, modality,
                                                           points=None if clicks is None else clicks[0],
                                                           point_labels=None if clicks is None else clicks[1])
            iou = [float(v) for v in ious]
            image.progress = Progress(state="done", done=len(boxes), total=len(boxes))
        image.labels, image.iou = labels, iou
        return label_response(image, kind)

    @v1.get("/images/{image_id}/labels", responses={200: {"content": LABEL_CONTENT}}, response_class=Response,
            summary="The latest segmentation again, in any format (e.g. to download it)")
    def get_labels(image_id: str, accept: Optional[str] = Header(None),
                   colour: bool = Query(False, description="2D: a colour PNG to look at (label i in its overlay "
                                        "colour, background black) instead of the label values 1..N")) -> Response:
        image = image_of(image_id)
        if image.labels is None:
            raise HTTPException(404, "no segmentation of this image yet: POST /v1/images/{id}/segment first")
        if not colour:
            return label_response(image, answer_kind(image, accept))
        if image.is_3d or results.negotiate(accept, (results.PNG,)) is None:
            raise HTTPException(406, "colour=true gives a PNG of a 2D image's labels (Accept: image/png)")
        return Response(results.colour_png(image.labels), media_type=results.PNG, headers={
            "Content-Disposition": f'attachment; filename="{image.name}_labels_colour.png"'})

    @v1.get("/images/{image_id}/progress", summary="Where the latest segment request stands")
    async def get_progress(image_id: str) -> dict[str, Any]:
        """``state`` idle, queued, running, done or failed; ``done`` of ``total`` box-slices decoded."""
        return image_of(image_id).progress.as_dict()

    @v1.get("/images/{image_id}/slices/{z}", response_class=Response,
            responses={200: {"content": {results.PNG: {}}}}, summary="A slice (or the 2D image, z = 0) as PNG")
    def get_slice(image_id: str, z: int) -> Response:
        image = image_of(image_id)
        depth = image.array.shape[0] if image.is_3d else 1
        if not 0 <= z < depth:
            raise HTTPException(404, f"no slice {z}: this image has {depth} slice{'s' * (depth > 1)} (0..{depth - 1})")
        pixels = image.array[z] if image.is_3d else image.array
        return Response(results.encode_png(pixels), media_type=results.PNG,
                        headers={"Cache-Control": "private, max-age=3600"})

    @v1.get("/info", summary="The model, its modalities, the formats and the limits")
    async def info() -> dict[str, Any]:
        return {
            "version": __version__,
            "model": {"description": m.raw.get("description", ""), "precision": m.precision,
                      "runs_at": segmenter.precision,
                      "backend": segmenter.engine.backend, "image_size": m.image_size, "clip": m.has_clip,
                      "gflops": {name: g.gflops for name, g in m.graphs.items()}},
            "modalities": list(segmenter.modalities),
            "prompts": {"points": segmenter.supports_points},
            "formats": {"upload": sorted(uploads.suffixes()), "labels_2d": [results.PNG, results.JSON, results.NPZ],
                        "labels_3d": [results.NPZ, results.JSON] + [results.NIFTI] * results.can_write_nifti(),
                        "native_volumes": results.can_write_nifti()},
            "limits": {"max_upload_mb": config.max_upload_mb, "max_image_mb": config.max_image_mb,
                       "max_images": config.max_images, "max_boxes": config.max_boxes, "cache_mb": config.cache_mb},
            "images": len(store),
            "uploads_receiving": store.receiving(),
        }

    app.include_router(v1)
    app.include_router(nninteractive.router(segmenter=segmenter, config=config, engine_lock=model, auth=authorised))

    @app.get("/healthz", summary="Liveness (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "auth": "bearer" if config.token else "none"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
