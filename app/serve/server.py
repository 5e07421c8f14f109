"""``mcp-medsam serve``: check the settings, load the model once, run the app under uvicorn."""

from __future__ import annotations

from pathlib import Path

from .config import ServeConfig, require_extra


def serve(config: ServeConfig, *, weights: Path | None = None, backend: str = "openvino", threads: int | None = None,
          cache_dir: Path | None = None, log_level: str = "info", precision: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM: in-flight requests finish, every upload is deleted).

    Raises ServeError for settings it must not start with (checked before the model loads),
    SegmentationError for an unusable model folder, ImportError without the ``serve`` extra.
    """
    config.check()
    require_extra()
    import uvicorn

    from ..segmenter import Segmenter
    from .app import create_app

    segmenter = Segmenter.load(weights, backend=backend, threads=threads, cache_dir=cache_dir, precision=precision)
    app = create_app(segmenter=segmenter, config=config)
    auth = "a token is required for /v1" if config.token else "no token"
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"mcp-medsam serve: http://{host}:{config.port}/ ({auth}; API docs at /docs; napari/3D Slicer nnInteractive "
          f"Remote mode: http://{host}:{config.port}/nninteractive)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, server_header=False,
                timeout_graceful_shutdown=config.shutdown_grace, log_config=log_config(log_level))


def log_config(level: str) -> dict:
    """uvicorn's logging set-up, with the app's own log (``mcp_medsam.*``) on its handler and level."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    known = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
    config["loggers"]["mcp_medsam"] = {"handlers": ["default"], "propagate": False,
                                       "level": level.upper() if level.upper() in known else "DEBUG"}  # trace
    return config
