"""CLIP inputs of the prompt encoder during training: image features of the crops, text features
of the modality tokens.

Image features are computed in batches on the training device inside the training loop (not in
data-loader workers, which would each hold a CLIP copy on the CPU: the official loader does that,
one crop at a time). They can be cached on disk, one small file per (case, slice, label, crop box,
flips), which is everything the CLIP crop depends on. Without a CLIP directory both features are
zeros, which is what the default model (the LiteMedSAM warm start) is trained and shipped with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mcp_medsam.io.atomic import atomic_file
from mcp_medsam_torch.clip import (
    ClipError,
    image_features,
    load_clip,
    text_features_from_clip,
    text_features_from_table,
)


class ClipFeatures:
    """(B, 3, C, C) crops -> (B, clip_dim) float32 features on ``device`` (zeros without CLIP)."""

    def __init__(self, *, clip_dir: str | None, clip_dim: int, clip_crop_size: int, device: torch.device,
                 cache_dir: str | None = None) -> None:
        self.clip_dim = clip_dim
        self.device = device
        self.clip = None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.hits = 0
        self.misses = 0
        if clip_dir:
            clip = load_clip(clip_dir)
            proj = int(clip.config.projection_dim)
            size = int(clip.config.vision_config.image_size)
            if proj != clip_dim:
                raise ClipError(f"{clip_dir}: CLIP projection dim {proj} != the model's clip_dim {clip_dim}")
            if size != clip_crop_size:
                raise ClipError(f"{clip_dir}: CLIP image size {size} != the model's clip_crop_size {clip_crop_size}")
            self.clip = clip.to(device)

    @property
    def enabled(self) -> bool:
        return self.clip is not None

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        h = hashlib.sha1(key.encode()).hexdigest()
        return self.cache_dir / h[:2] / f"{h}.npy"

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor | None, keys: Sequence[str], *, batch: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """crops (B, 3, C, C) float32 in [0, 1] (None without CLIP); keys: B cache keys."""
        n = len(keys)
        if self.clip is None:
            return torch.zeros(n, self.clip_dim, device=self.device)
        if crops is None:
            raise ClipError("CLIP is enabled but the batch has no CLIP crops")
        out = torch.empty(n, self.clip_dim, device=self.device)
        todo = list(range(n))
        cached = use_cache and self.cache_dir is not None
        if cached:
            todo = []
            for i, k in enumerate(keys):
                p = self._path(k)
                if p.is_file():
                    out[i] = torch.from_numpy(np.load(p)).to(self.device)
                    self.hits += 1
                else:
                    todo.append(i)
        if todo:
            self.misses += len(todo)
            x = crops[todo].to(self.device, non_blocking=True)
            step = batch or len(todo)
            feats = torch.cat([image_features(self.clip, x[j:j + step]) for j in range(0, len(todo), step)])
            out[todo] = feats
            if cached:
                arr = feats.cpu().numpy().astype(np.float32)
                for j, i in enumerate(todo):
                    with atomic_file(self._path(keys[i]), "wb") as f:
                        np.save(f, arr[j])
        return out


def text_table(*, tokens: Sequence[str], clip_dim: int, device: torch.device, table_path: str | None = None,
               clip_dir: str | None = None) -> torch.Tensor:
    """(len(tokens), clip_dim) float32 text features, one row per modality token, computed once.

    From an (11, D) table in category order if given, else from the CLIP text tower, else zeros.
    """
    if table_path:
        arr = text_features_from_table(table_path, list(tokens))
    elif clip_dir:
        arr = text_features_from_clip(load_clip(clip_dir), clip_dir, list(tokens))
    else:
        return torch.zeros(len(tokens), clip_dim, device=device)
    if arr.shape[1] != clip_dim:
        raise ClipError(f"text features have dim {arr.shape[1]}, the model expects {clip_dim}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)
