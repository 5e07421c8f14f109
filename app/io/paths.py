"""Checks of input and output locations, made once before a model loads: each problem is one InputError line.

Every entry point that writes results calls these (``predict`` today; ``segment``, ``serve`` and
cluster runs as they come): :func:`check_input_dir`, :func:`list_cases`, :func:`check_output_dir`,
:func:`check_output_file`, then :func:`mcp_medsam.io.atomic.remove_stale_temps` on each output folder.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import InputError
from .atomic import TEMP_SUFFIX


def _why(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder (a path "under a file"), else None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _guarded(check: Callable[..., Path]) -> Callable[..., Path]:
    """A check whose stray OSError (a search permission missing on an ancestor, ...) becomes one InputError."""
    @functools.wraps(check)
    def run(path: str | Path, **kw: Any) -> Path:
        try:
            return check(path, **kw)
        except OSError as exc:
            raise InputError(f"cannot use {path} ({_why(exc)})") from None
    return run


@_guarded
def check_input_dir(folder: str | Path, *, what: str = "input folder") -> Path:
    """``folder`` resolved; InputError when it is missing, a file or unreadable."""
    folder = Path(folder)
    if not folder.exists():
        under = _file_ancestor(folder)
        if under is not None:
            raise InputError(f"{what} {folder} does not exist ({under} is a file)")
        raise InputError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder")
    try:
        with os.scandir(folder):
            pass
    except OSError as exc:
        raise InputError(f"cannot read {what} {folder} ({_why(exc)})") from None
    return folder.resolve()


def list_cases(folder: Path, suffix: str = ".npz") -> tuple[list[Path], list[str]]:
    """The regular files named ``*<suffix>`` in a folder, sorted, and one note per other entry of that
    name that is skipped (a folder, a FIFO, a broken symlink, ...)."""
    files, skipped = [], []
    for p in sorted(folder.glob(f"*{suffix}")):
        try:
            mode = p.stat().st_mode
        except OSError as exc:
            kind = "a broken symbolic link" if p.is_symlink() else f"unreadable ({_why(exc)})"
            skipped.append(f"skipped {p.name}: {kind}")
            continue
        if stat.S_ISREG(mode):
            files.append(p)
        else:
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            skipped.append(f"skipped {p.name}: {kind}")
    return files, skipped


def same_place(a: str | Path, b: str | Path) -> bool:
    """Whether two existing paths are one file or folder, by identity (device and inode): a bind
    mount, a second mount of one folder, a symbolic or hard link all count as the same."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def within(inner: str | Path, outer: str | Path) -> bool:
    """Whether ``inner`` (existing or not) is ``outer`` or lies under it, by identity: each existing
    ancestor of ``inner`` (symbolic links resolved) is compared with ``outer`` by device and inode,
    so a bind mount or another mount of ``outer`` is seen through."""
    path = Path(inner).resolve()
    for p in (path, *path.parents):
        if p.exists() and same_place(p, outer):
            return True
    return False


def _nesting(out: Path, inputs: Iterable[str | Path], what: str) -> None:
    for inp in inputs:
        src = Path(inp)
        if not src.is_dir():
            continue
        if same_place(out, src):
            raise InputError(f"{what} {out} is the input folder {src}: the results would replace the inputs; "
                             f"choose another folder")
        if within(out, src):
            raise InputError(f"{what} {out} is inside the input folder {src}; choose a folder outside it")
        if out.exists() and within(src, out):
            raise InputError(f"the input folder {src} is inside the {what} {out}; choose a folder outside it")


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(path.anchor or ".")


@_guarded
def check_output_dir(folder: str | Path, *, inputs: Iterable[str | Path] = (), what: str = "output folder") -> Path:
    """Check that ``folder`` can take results and return it resolved, or raise one InputError.

    Refused: a file; a path under a file; the input folder itself, a folder inside an input
    folder, or one that contains an input folder (``inputs``: folders, compared by identity, so a
    bind mount or link of an input folder is refused too; files are ignored here, see
    :func:`check_output_file`); a folder that cannot be created or written (checked by creating and
    removing a temp file in it, or in its nearest existing ancestor, which also catches read-only
    file systems and ACLs). The folder is not created here: the first result written creates it
    (:func:`mcp_medsam.io.atomic.atomic_file`), so a run that fails before writing leaves nothing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder")
    under = _file_ancestor(folder)
    if under is not None:
        raise InputError(f"{what} {folder} cannot be created: {under} is a file")
    resolved = folder.resolve()
    _nesting(resolved, inputs, what)
    base = _nearest_existing(resolved)
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-check.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if base == resolved:
            raise InputError(f"{what} {folder} is not writable ({_why(exc)})") from None
        raise InputError(f"cannot create {what} {folder} ({base} is not writable: {_why(exc)})") from None
    return resolved


@_guarded
def check_output_file(path: str | Path, *, inputs: Iterable[str | Path] = (), what: str = "output file") -> Path:
    """Make ``path``'s folder ready (:func:`check_output_dir`) and return the path resolved, or raise
    one InputError: a folder, an input file itself, or a path inside an input folder is refused."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder")
    under = _file_ancestor(path)
    if under is not None:
        raise InputError(f"{what} {path} cannot be created: {under} is a file")
    resolved = path.resolve()
    for inp in inputs:
        src = Path(inp)
        if same_place(resolved, src) or resolved == src.resolve():
            raise InputError(f"{what} {path} is an input file; choose another name")
        if src.is_dir() and within(resolved.parent, src):
            raise InputError(f"{what} {path} is inside the input folder {src}; choose a place outside it")
    check_output_dir(resolved.parent, what=f"folder of the {what}")
    return resolved
