"""The service's settings and the one rule about where it may listen.

Torch-free and FastAPI-free: the ``serve`` command checks the bind address before it loads anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import SegmentationError

TOKEN_ENV = "MCP_MEDSAM_TOKEN"
MB = 1024 * 1024
MIN_TOKEN = 16  # characters: a guessable token is no guard
# The Host names a token-less server answers to (DNS rebinding: a foreign name pointed at 127.0.0.1).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ServeError(SegmentationError):
    """A setting the service cannot start with (the command prints it as one line, exit status 2)."""

    exit_code = 2


class MissingExtra(ServeError):
    """The ``serve`` extra (FastAPI, uvicorn, python-multipart) is not installed (exit status 1)."""

    exit_code = 1


def require_extra() -> None:
    """Raise MissingExtra naming the first missing package of the ``serve`` extra."""
    import importlib.util

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"),
                            ("blosc2", "blosc2")):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(f"serve needs {package}: pip install 'mcp-medsam[serve]'")


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen and what to accept. Sizes in MB (2**20 bytes).

    max_upload_mb: one upload's request body (413 above); max_image_mb: the decoded uint8 array of
    one upload (413 above, checked from the file's header before decoding where the format allows);
    max_images: images held at once (413 for one more; DELETE frees a place); max_boxes: boxes per
    segment request (422 above); cache_mb: embeddings of volume slices kept across requests, for all
    volumes together (4 MB per slice with the default model; least recently used volume dropped
    first); cors_origins: origins allowed to call from a browser (none: no CORS headers);
    temp_dir: where the private upload folder is made (None: the system's temporary folder);
    allowed_hosts: Host names answered besides the loopback ones when no token is set (a token-less
    server refuses other Host names and foreign Origins on the API: DNS rebinding, cross-site posts);
    body_timeout: seconds a request body may go without a byte before the request is dropped (408);
    shutdown_grace: seconds in-flight requests get at shutdown before they are answered 503.
    modality: the modality of nnInteractive sessions and of /v1 uploads that name none (None: a
    session's volume with values below -500 is CT, else MR); sessions: nnInteractive sessions at
    once (503 for one more), each keeping slice embeddings of at most cache_mb / sessions;
    session_idle_s / session_liveness_s: a session is freed after this long without an interaction /
    without any request (heartbeats count).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_mb: float = 512.0
    max_image_mb: float = 1024.0
    max_images: int = 16
    max_boxes: int = 64
    cache_mb: float = 1024.0
    cors_origins: tuple[str, ...] = ()
    temp_dir: Path | None = None
    modality: str | None = None
    sessions: int = 4
    session_idle_s: float = 600.0
    session_liveness_s: float = 60.0
    allowed_hosts: tuple[str, ...] = ()
    body_timeout: float = 30.0
    shutdown_grace: float = 30.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MB)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * MB)

    def check(self) -> None:
        """Raise ServeError for settings the service must not start with (before any model loads)."""
        if not is_loopback(self.host) and not self.token:
            raise ServeError(f"refusing to listen on {self.host} without a token: pass --token T or set "
                             f"${TOKEN_ENV} (every request then needs 'Authorization: Bearer T'), "
                             f"or keep the default --host 127.0.0.1")
        if self.token is not None and (not self.token.strip() or any(c.isspace() for c in self.token)):
            raise ServeError("the token must be non-empty and contain no spaces")
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise ServeError(f"the token has {len(self.token)} characters; use at least {MIN_TOKEN} (e.g. "
                             f"python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        for name in ("body_timeout", "shutdown_grace"):
            if not getattr(self, name) > 0:
                raise ServeError(f"--{name.replace('_', '-')} must be above zero (seconds)")
        for name in ("max_upload_mb", "max_image_mb", "cache_mb"):
            if getattr(self, name) <= 0:
                raise ServeError(f"--{name.replace('_', '-')} must be positive")
        if self.max_images < 1 or self.max_boxes < 1:
            raise ServeError("--max-images and --max-boxes must be at least 1")
        if self.sessions < 1 or not (self.session_idle_s > 0 and self.session_liveness_s > 0):
            raise ServeError("--sessions must be at least 1 and the session timeouts positive")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port {self.port} is not a TCP port (0..65535)")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything
