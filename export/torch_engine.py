"""The PyTorch model behind the runtime's Engine interface, for side-by-side benchmarks and checks.

The same Segmenter (preprocessing, batching, 3D propagation) drives it, so a timing difference is
the difference between the PyTorch modules and the exported graphs, nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mcp_medsam.engine import CallStats
from mcp_medsam.manifest import Manifest

from .checkpoints import load_mcp_medsam, warm_start_from_litemedsam
from .exporter import ExportConfig, modality_token_table, text_features_for
from .wrappers import GRAPH_IO, ClipImageGraph, DecoderGraph, ImageEncoderGraph


class TorchEngine:
    """encode / decode / clip with the PyTorch modules the manifest's graphs were exported from."""

    def __init__(self, manifest: Manifest, *, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.manifest = manifest
        self.stats = CallStats()
        src = manifest.raw["source"]
        if src["kind"] == "litemedsam-warm-start":
            model = warm_start_from_litemedsam()[0]
        else:
            path = Path(src["file"])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint this export was made from is not here")
            model = load_mcp_medsam(path)[0]
        clip_info = manifest.raw["clip"]
        clip = tower = None
        if clip_info.get("tower"):
            from .clip import ClipImageTower, load_clip

            clip = load_clip(clip_info["path"])
            tower = ClipImageTower(clip).eval()
        cfg = ExportConfig(out=Path("."), clip=Path(clip_info["path"]) if clip else None,
                           text_features=Path(clip_info["file"]) if clip_info.get("text_features") == "table" else None)
        tokens = list(manifest.modality_tokens)
        text, _ = text_features_for(cfg, clip, tokens, model.config.clip_dim)
        self._encoder = ImageEncoderGraph(model).eval()
        self._decoder = DecoderGraph(model, modality_tokens=modality_token_table(model, text, tokens),
                                     with_clip=tower is not None).eval()
        self._clip = ClipImageGraph(tower).eval() if tower is not None else None

    def _timed(self, graph: str, items: int, fn, *args):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(*args)
        self.stats.add(graph, items, time.perf_counter() - t)
        return out

    @property
    def has_clip(self) -> bool:
        return self._clip is not None

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._timed("image_encoder", len(images), self._encoder, torch.from_numpy(images)).numpy()

    def clip(self, crops: np.ndarray) -> np.ndarray:
        return self._timed("clip_image", len(crops), self._clip, torch.from_numpy(crops)).numpy()

    def decode(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        names = list(GRAPH_IO["decoder"]["inputs"][: 6 if self._clip is not None else 5])
        args = [torch.from_numpy(np.ascontiguousarray(feed[k])) for k in names]
        logits, iou, category = self._timed("decoder", len(feed["boxes"]), self._decoder, *args)
        return logits[:, 0].numpy(), iou[:, 0].numpy(), category.numpy()
