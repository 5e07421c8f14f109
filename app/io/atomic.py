"""Atomic writes and clean interruption: a result is either whole in its place or not there at all.

Writes go to a temporary file in the target folder (``.<name>.<random>.mcp-medsam.tmp``), locked
while it is written, then renamed over the target with ``os.replace``. The lock is what lets
:func:`remove_stale_temps` tell a temp file left by a killed run (unlocked: removed) from one a
concurrent run is writing (locked: kept).

SIGTERM and SIGINT, inside :func:`stop_on_signals`, raise :class:`Interrupted` (a ``BaseException``,
so that per-case ``except Exception`` handlers do not swallow it): the write in flight removes its
temp file on the way out. :func:`deferred_signals` holds them back while a result and its record
are committed together.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no locks, stale temp files are then kept rather than risked
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".mcp-medsam.tmp"
# Temp names of this tool: the current form, and the one before it (".<name>.<8 random>.tmp").
_TEMP_NAME = re.compile(r"^\..+(\.mcp-medsam\.tmp|\.npz\.[a-z0-9_]{8}\.tmp|\.(csv|png|json)\.[a-z0-9_]{8}\.tmp)$")


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give results the mode a plain open() would (e.g. 0644), so that
    # outputs written in a container stay readable by the host and by other users.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _lock(fd: int, *, block: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: proceed unlocked
        return True


def _locked_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new temp file in ``folder``, created and locked (retried if a cleanup removed it in between)."""
    for _ in range(5):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
        _lock(fd, block=True)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(f"cannot create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.chmod(tmp, _umask_mode())
            # Renamed while still open (and locked), so a concurrent cleanup never takes it for stale.
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files of this tool that no live writer holds (left by a killed run); returns them."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_NAME.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a writer holds it
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # held by a live writer, or no flock here: keep it
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """An exclusive lock on a folder, shared by every process of this tool (a read-modify-write of
    a file in it, such as the timing CSV of concurrent runs). Without flock support: no lock."""
    fd = None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        pass
    try:
        if fd is not None:
            _lock(fd, block=True)
        yield
    finally:
        if fd is not None:
            os.close(fd)


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


# ---------------------------------------------------------------- interruption


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived inside :func:`stop_on_signals`; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.finished = 0  # cases completed before it (set by the runner that was interrupted)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + self.signum


class _SignalState:
    depth = 0  # nesting of deferred_signals()
    pending: int | None = None
    installed = 0  # nesting of stop_on_signals()
    previous: dict[int, Any] = {}


def _on_signal(signum: int, frame: Any) -> None:
    if _SignalState.depth:
        _SignalState.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` inside the block (main thread only; elsewhere a
    no-op). Blocks may nest; the handlers in place before the outermost one come back after it."""
    if _SignalState.installed == 0:
        try:
            _SignalState.previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread: signals stay as they are
            yield
            return
        _SignalState.pending = None
    _SignalState.installed += 1
    try:
        yield
    finally:
        _SignalState.installed -= 1
        if _SignalState.installed == 0:
            for s, h in _SignalState.previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back for the block (a commit that must be whole), then raise :class:`Interrupted`."""
    _SignalState.depth += 1
    try:
        yield
    finally:
        _SignalState.depth -= 1
        if not _SignalState.depth and _SignalState.pending is not None and _SignalState.installed:
            signum, _SignalState.pending = _SignalState.pending, None
            raise Interrupted(signum)
