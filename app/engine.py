"""Inference backends over the exported graphs (OpenVINO by default, ONNX Runtime optional).

Both read the graph files and input/output names from the manifest. OpenVINO runs with the
inference precision pinned (f32 unless asked otherwise): on CPUs with AMX or AVX512-BF16 it
would otherwise silently run bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import EngineError, ManifestError
from .manifest import Manifest

BACKENDS = ("openvino", "onnxruntime")


class Runner(Protocol):
    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass
class CallStats:
    """Graph calls made and the FLOPs they stand for (for the floor-relative benchmark)."""

    calls: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, graph: str, items: int, seconds: float) -> None:
        self.calls[graph] = self.calls.get(graph, 0) + 1
        self.items[graph] = self.items.get(graph, 0) + items
        self.seconds[graph] = self.seconds.get(graph, 0.0) + seconds

    def gflops(self, manifest: Manifest) -> float:
        return sum(manifest.graphs[g].gflops * n for g, n in self.items.items())


def _openvino_runners(manifest: Manifest, *, cache_dir: Path | None, threads: int | None,
                      precision_hint: str) -> dict[str, Runner]:
    import openvino as ov

    core = ov.Core()
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            if os.access(cache_dir, os.W_OK):
                core.set_property({"CACHE_DIR": str(cache_dir)})
        except OSError:
            pass  # a read-only cache location only costs the compile time
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    # Compiled side by side: loading from the cache is mostly single-threaded work, so a cold start
    # overlaps the graphs instead of paying for them in turn.
    from concurrent.futures import ThreadPoolExecutor

    names = list(manifest.graphs)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        compiled_all = list(pool.map(
            lambda n: core.compile_model(str(manifest.graph_file(n, "openvino")), "CPU", config), names))
    runners: dict[str, Runner] = {}
    for name, compiled in zip(names, compiled_all):
        request = compiled.create_infer_request()
        n_out = len(compiled.outputs)

        def run(feed: dict[str, np.ndarray], request: Any = request, n_out: int = n_out) -> list[np.ndarray]:
            request.infer(feed, share_inputs=True)
            return [request.get_output_tensor(i).data.copy() for i in range(n_out)]

        runners[name] = run
    return runners


def _onnxruntime_runners(manifest: Manifest, *, threads: int | None) -> dict[str, Runner]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineError("--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    runners: dict[str, Runner] = {}
    for name in manifest.graphs:
        sess = ort.InferenceSession(str(manifest.graph_file(name, "onnx")), opts, providers=["CPUExecutionProvider"])
        runners[name] = lambda feed, sess=sess: sess.run(None, feed)
    return runners


class Engine:
    """The three graphs of an exported model behind typed calls.

    encode: (N, 3, S, S) float32 -> (N, C, E, E) float32.
    decode: the per-box graph's feed for B boxes (embeddings (K, C, E, E), indices, grid boxes,
            crops, modality rows) -> logits (B, S, S), iou (B,), category logits (B, 11).
    clip:   (B, 3, 224, 224) -> (B, 512) (models with a CLIP tower only).
    """

    def __init__(self, manifest: Manifest, *, backend: str = "openvino", cache_dir: Path | None = None,
                 threads: int | None = None, precision_hint: str = "f32") -> None:
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.manifest = manifest
        self.backend = backend
        self.stats = CallStats()
        try:
            if backend == "openvino":
                self._run = _openvino_runners(manifest, cache_dir=cache_dir, threads=threads,
                                              precision_hint=precision_hint)
            else:
                self._run = _onnxruntime_runners(manifest, threads=threads)
        except ManifestError as exc:
            raise EngineError(str(exc)) from exc
        self._names = {n: (list(g.inputs), list(g.outputs)) for n, g in manifest.graphs.items()}

    def _call(self, graph: str, feed: dict[str, np.ndarray], items: int) -> list[np.ndarray]:
        import time

        t = time.perf_counter()
        out = self._run[graph](feed)
        self.stats.add(graph, items, time.perf_counter() - t)
        return out

    def encode(self, images: np.ndarray) -> np.ndarray:
        (name,), _ = self._names["image_encoder"]
        return self._call("image_encoder", {name: images}, len(images))[0]

    def clip(self, crops: np.ndarray) -> np.ndarray:
        (name,), _ = self._names["clip_image"]
        return self._call("clip_image", {name: crops}, len(crops))[0]

    def decode(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """feed: :func:`mcp_medsam.prompts.decoder_feed` for B boxes -> logits (B, S, S), iou (B,),
        category logits (B, 11)."""
        ins, _ = self._names["decoder"]
        missing = [k for k in ins if k not in feed]
        if missing:
            raise EngineError(f"the decoder graph needs {', '.join(missing)} (a model with a CLIP tower needs "
                              f"CLIP image features)")
        logits, iou, category = self._call("decoder", {k: feed[k] for k in ins}, len(feed["boxes"]))
        return logits[:, 0], iou[:, 0], category

    @property
    def has_clip(self) -> bool:
        return "clip_image" in self._run


def default_cache_dir() -> Path:
    """OpenVINO compiled-model cache: $MCP_MEDSAM_CACHE, else ~/.cache/mcp-medsam/openvino."""
    env = os.environ.get("MCP_MEDSAM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcp-medsam" / "openvino"

