"""Atomic writes: a temporary file in the target folder, then os.replace (never half-written)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give results the mode a plain open() would (e.g. 0644), so that
    # outputs written in a container stay readable by the host and by other users.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_file(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)
