"""``mcp-medsam serve``: an HTTP service that embeds an uploaded image once and decodes every box drawn
on it, with a web page to draw boxes on images and volumes (extra ``serve``: FastAPI, uvicorn).

Modules: :mod:`.config` (limits, the bind and token rule), :mod:`.guards` (Host/Origin, body timeout,
shutdown, access log), :mod:`.uploads` (multipart streamed into a
private folder, files read into arrays), :mod:`.store` (the images and their embeddings, a bounded
slice-embedding cache), :mod:`.results` (label PNG / JSON / NPZ / NIfTI bodies), :mod:`.app` (the
FastAPI app), :mod:`.server` (uvicorn), :mod:`.loadcheck` (the ``serve-bench`` load check).
Importing this package loads neither FastAPI nor the model.
"""

from __future__ import annotations

from .config import MissingExtra, ServeConfig, ServeError

__all__ = ["MissingExtra", "ServeConfig", "ServeError"]
