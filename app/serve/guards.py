"""What stands between the network and the app: the Host/Origin rule of a token-less server, request-body
timeouts, the answer to requests cut off at shutdown, and the access log's shortened ids.

Without a token the API's only guard is that nothing but this machine can reach it. Two ways round
that are closed here: DNS rebinding (a web page's own host name pointed at 127.0.0.1 sends a foreign
``Host``) and cross-site requests (a page elsewhere posting a multipart form, which needs no CORS
preflight; browsers send its ``Origin``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Iterable
from urllib.parse import urlsplit

from .config import LOOPBACK_NAMES

log = logging.getLogger("mcp_medsam.serve")
# Path prefixes that hold data (the API, and the nnInteractive protocol's routes).
GUARDED_PREFIXES = ("/v1", "/nninteractive")
_ID = re.compile(r"(/v1/images/)([A-Za-z0-9_-]{6})[A-Za-z0-9_-]+")


def short_id(image_id: str) -> str:
    """An image id as the logs show it (its first 6 characters): the full id is the capability."""
    return f"{image_id[:6]}…"


def shorten_ids(text: str) -> str:
    """Every ``/v1/images/<id>`` in ``text`` with its id shortened as :func:`short_id` does."""
    return _ID.sub(r"\1\2…", text)


async def send_json(send: Any, status: int, detail: str, *, close: bool = False) -> None:
    """A ``{"detail": ...}`` response straight on the ASGI channel (for layers outside FastAPI)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def host_name(host: str) -> str:
    """The name part of a Host header (``[::1]:8000`` -> ``[::1]``, ``LocalHost:80`` -> ``localhost``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostOriginGuard:
    """ASGI middleware of a token-less server: a Host header naming anything but this machine (or an
    ``allowed`` name) gets 400; on :data:`GUARDED_PREFIXES`, an ``Origin`` other than the page's own
    (the Host it was served from) or a ``cors`` origin gets 403, preflights and simple form posts alike.
    """

    def __init__(self, app: Any, *, allowed: Iterable[str] = (), cors: Iterable[str] = ()) -> None:
        self.app = app
        self.names = {*LOOPBACK_NAMES, *(host_name(h) for h in allowed if h.strip())}
        self.cors = {o.rstrip("/").lower() for o in cors}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if host_name(host) not in self.names:
            log.warning("refused a request for Host %r (not a name of this server; --allowed-host adds one)", host)
            await send_json(send, 400, f"this server answers to {', '.join(sorted(self.names))} only (Host "
                                       f"{host!r}); a name of your own needs --allowed-host or a --token", close=True)
            return
        origin = headers.get(b"origin")
        if origin is not None and scope["path"].startswith(GUARDED_PREFIXES):
            text = origin.decode("latin-1").rstrip("/").lower()
            parts = urlsplit(text)
            if text not in self.cors and not (parts.scheme in ("http", "https") and parts.netloc == host.lower()):
                log.warning("refused a request from Origin %r on %s", text, scope["path"])
                await send_json(send, 403, f"requests from pages of another origin ({text}) are refused; "
                                           f"--cors-origin allows one", close=True)
                return
        await self.app(scope, receive, send)


class ShutdownGuard:
    """ASGI middleware: a request still running when the shutdown grace period ends (uvicorn cancels
    it) is answered ``503`` JSON, and its cancellation logged as one line instead of a traceback."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            log.warning("%s %s cut off by the shutdown", scope["method"], shorten_ids(scope["path"]))
            if not started:
                await send_json(send, 503, "the server is shutting down; try again when it is back", close=True)


class BodyTimeout(Exception):
    """A request body that stopped arriving (raised from ``receive``; the app answers 408)."""


async def receive_within(receive: Any, seconds: float) -> dict:
    """The next ASGI message, or BodyTimeout when none arrives within ``seconds``."""
    try:
        return await asyncio.wait_for(receive(), seconds)
    except TimeoutError:
        raise BodyTimeout(f"no byte of the request body arrived for {seconds:g} s (--body-timeout)") from None


class AccessLogFilter(logging.Filter):
    """On uvicorn's access log: image ids shortened as the app's own log does, and progress polls
    (a page asks several times a second while a volume propagates) at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            record.args = (*args[:2], shorten_ids(path), *args[3:])
            if path.split("?", 1)[0].endswith("/progress"):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True
