"""The images one server process holds: each in its own private folder, with its embeddings.

A 2D image is embedded once at upload (:class:`mcp_medsam.Embedding`, 4 MB with the default model);
a volume's slices are embedded on demand into a per-volume :class:`~mcp_medsam.segmenter.EmbeddingCache`,
and all volumes' caches together stay within ``cache_bytes`` (the least recently used volume's cache
is dropped first; its slices are embedded again when it is next segmented).

Ids are 144-bit random URL-safe strings: the id is the capability; nothing lists them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..segmenter import Embedding, EmbeddingCache, Segmenter


ROOT_PREFIX = "mcp-medsam-serve-"
# Held (flock) by the live server that owns a root; a root whose lock is free was left by a killed one.
OWNER_LOCK = ".owner.lock"


def _hold_owner_lock(root: Path) -> int | None:
    """Lock ``root/OWNER_LOCK`` for this process's lifetime (the descriptor stays open; the kernel
    drops the lock when the process dies, however it dies). None where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: stale roots are not detected
        return None
    new = root / (OWNER_LOCK + ".new")
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(new, root / OWNER_LOCK)  # locked before anyone can see it under its name
    return fd


def _remove_root(root: str, owner: int | None) -> None:
    shutil.rmtree(root, ignore_errors=True)
    if owner is not None:
        with contextlib.suppress(OSError):
            os.close(owner)


def remove_stale_roots(parent: Path) -> list[Path]:
    """Delete the upload roots under ``parent`` that a killed server of this user left: a folder
    ``mcp-medsam-serve-*`` owned by this user whose owner lock nobody holds. Folders without the lock
    file (another program's, or a server still starting) and those of live servers are kept."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return []
    removed = []
    for entry in sorted(parent.glob(ROOT_PREFIX + "*")):
        try:
            st = entry.lstat()
            fd = os.open(entry / OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live server holds it
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


class StoreFull(Exception):
    """No place for one more image (``max_images`` reached)."""


class StoreBusy(Exception):
    """Too many uploads being received at once (``max_receiving``)."""


@dataclass
class Progress:
    """Where the latest segment request of an image stands: box-slices decoded of ``total``.

    state: ``idle`` (none yet), ``queued`` (waiting for the model), ``running``, ``done``, ``failed``.
    """

    state: str = "idle"
    done: int = 0
    total: int = 0
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "done": self.done, "total": self.total, "message": self.message}


@dataclass(eq=False)
class StoredImage:
    """One upload. array: (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D; labels: the latest result
    ((H, W) or (D, H, W), uint8 or uint16) and iou: its per-box predicted IoU (2D only)."""

    id: str
    folder: Path
    name: str
    source: str
    array: np.ndarray
    is_3d: bool
    spacing: tuple[float, ...] | None
    modality: str | None
    native: Any = None
    boxes: list[list[int]] | None = None
    embedding: Embedding | None = None
    cache: EmbeddingCache | None = None
    labels: np.ndarray | None = None
    iou: list[float] | None = None
    progress: Progress = field(default_factory=Progress)
    used: float = field(default_factory=time.monotonic)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape) if self.is_3d else tuple(self.array.shape[:2])

    def describe(self) -> dict[str, Any]:
        spacing = None if self.spacing is None else list(self.spacing)
        return {"id": self.id, "shape": list(self.shape), "spacing": spacing, "modality": self.modality,
                "dims": 3 if self.is_3d else 2, "format": self.source.lstrip("."), "name": self.name,
                "boxes": self.boxes}


class ImageStore:
    """Images by id, their private folders under one 0700 temporary root, and the slice-cache budget.

    Thread-safe for add/get/delete; :meth:`slice_cache` must be called with the model lock held
    (caches are only touched by model calls, which the app serialises).
    """

    def __init__(self, *, max_images: int, cache_bytes: int, temp_dir: Path | None = None,
                 max_receiving: int | None = None) -> None:
        self.max_images = max_images
        self.max_receiving = max_receiving or 4 * max_images
        self.cache_bytes = cache_bytes
        # Roots of servers of this user that were killed (SIGKILL, OOM) before they could clean up.
        self.removed_stale = remove_stale_roots(Path(temp_dir or tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=temp_dir))  # mode 0700
        owner = _hold_owner_lock(self.root)
        # Also removed when the store is collected or the interpreter exits without a clean shutdown.
        self._cleanup = weakref.finalize(self, _remove_root, str(self.root), owner)
        self._images: dict[str, StoredImage] = {}
        self._reserved: set[str] = set()
        self._receiving: set[str] = set()
        self._lock = threading.Lock()

    def begin_upload(self) -> tuple[str, Path]:
        """A new id and its empty private folder for an upload being received; it holds no place among
        ``max_images`` until :meth:`reserve` (a client that stalls mid-body holds no place). Raises
        StoreBusy when ``max_receiving`` uploads are being received already."""
        with self._lock:
            if len(self._receiving) >= self.max_receiving:
                raise StoreBusy(f"{self.max_receiving} uploads are being received already; try again shortly")
            image_id = secrets.token_urlsafe(18)
            self._receiving.add(image_id)
        folder = self.root / image_id
        folder.mkdir(mode=0o700)
        return image_id, folder

    def reserve(self, image_id: str) -> None:
        """Take a place for a received upload; raises StoreFull when ``max_images`` are held."""
        with self._lock:
            if len(self._images) + len(self._reserved) >= self.max_images:
                raise StoreFull(f"this server holds at most {self.max_images} images (--max-images); "
                                f"DELETE /v1/images/{{id}} one first")
            self._receiving.discard(image_id)
            self._reserved.add(image_id)

    def add(self, image: StoredImage) -> None:
        with self._lock:
            self._reserved.discard(image.id)
            self._images[image.id] = image

    def release(self, image_id: str) -> None:
        """Give up an upload's id (refused, failed or cut off): its folder and file are deleted."""
        with self._lock:
            self._receiving.discard(image_id)
            self._reserved.discard(image_id)
        shutil.rmtree(self.root / image_id, ignore_errors=True)

    def get(self, image_id: str) -> StoredImage | None:
        with self._lock:
            image = self._images.get(image_id)
        if image is not None:
            image.used = time.monotonic()
        return image

    def delete(self, image_id: str) -> bool:
        with self._lock:
            image = self._images.pop(image_id, None)
        if image is None:
            return False
        shutil.rmtree(image.folder, ignore_errors=True)
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def receiving(self) -> int:
        """Uploads whose body is still arriving."""
        with self._lock:
            return len(self._receiving)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(im.cache.array.nbytes for im in self._images.values() if im.cache is not None)

    def slice_cache(self, image: StoredImage, segmenter: Segmenter) -> EmbeddingCache:
        """The slice-embedding cache of a volume, made on first use within the budget (model lock held)."""
        if image.cache is not None:
            return image.cache
        m = segmenter.manifest
        slot = m.embed_dim * m.embedding_size * m.embedding_size * 4
        cache = segmenter.slice_cache(min(image.array.shape[0], max(self.cache_bytes // slot, 1)))
        need = cache.array.nbytes
        with self._lock:
            others = sorted((im for im in self._images.values() if im.cache is not None and im is not image),
                            key=lambda im: im.used)
            held = sum(im.cache.array.nbytes for im in others)
            for victim in others:  # least recently used first
                if held + need <= self.cache_bytes:
                    break
                held -= victim.cache.array.nbytes
                victim.cache = None
        image.cache = cache
        return cache

    def close(self) -> None:
        """Delete every image and the temporary root."""
        with self._lock:
            self._images.clear()
            self._reserved.clear()
            self._receiving.clear()
        self._cleanup()
