"""Export verification: the written folder, loaded by the runtime's own engine, against PyTorch.

The folder is read back as every user reads it (``mcp_medsam.manifest.load_manifest`` and
``mcp_medsam.engine.Engine``, for OpenVINO and, when the folder lists ONNX files, ONNX Runtime).
Every graph it lists (image encoder, per-box decoder, CLIP image tower) gets the same inputs as the
PyTorch module it was exported from: random tensors and real cases of ``--verify-data``
(:func:`mcp_medsam_torch.cases.case_slices`, prompts built by :mod:`mcp_medsam.prompts` as inference
builds them; the decoder and the CLIP tower see PyTorch's own embeddings and features, so each
graph is judged on its own). Each (graph, precision) is held to the bar in :data:`BARS`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mcp_medsam import preprocess, prompts
from mcp_medsam.engine import Engine
from mcp_medsam.errors import SegmentationError
from mcp_medsam.manifest import Manifest, load_manifest

from .cases import case_slices, spread_cases, table_row
from .config import ExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bar:
    """What a graph must reach against PyTorch on the judged inputs.

    metric: ``sign_agreement`` (share of output elements whose sign agrees: for logits, the mask
    pixels) must be at least ``value``; ``rel_max_diff`` (max |diff| / max |PyTorch output|) must be
    at most ``value``. ``real_only``: random inputs are reported, not judged (INT8 is calibrated for
    real inputs).
    """

    metric: str
    value: float
    real_only: bool = False

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.metric == "sign_agreement" else figure <= self.value

    def __str__(self) -> str:
        op = ">=" if self.metric == "sign_agreement" else "<="
        return f"{self.metric} {op} {self.value:g}" + (" (real inputs)" if self.real_only else "")


# The bars, in one place. Keys: (graph, precision of that graph's file). Decoder outputs are mask
# logits: the share of mask pixels that agree. Encoder and CLIP outputs are features: max |diff|
# relative to the largest PyTorch value. Measured (tiny test model, the golden full-size model with
# its tiny CLIP, the LiteMedSAM warm start; real and random inputs; OpenVINO and ONNX Runtime):
# fp32 files rel <= 6.5e-6 (encoder), 5.6e-7 (CLIP); float16-stored IR rel <= 1.0e-2 (encoder; the
# warm start 5.9e-3), 4.7e-4 (CLIP); decoder agreement >= 99.98 % (fp16), 100 % (fp32). The bars
# leave a margin of 5x or more (float16 CLIP gets the encoder's bar: PubMedCLIP's ViT-B is far deeper
# than the tiny test tower measured). An INT8 encoder has no bar here: quantisation's accuracy control
# already held the INT8 chain to the mask-Dice target against FP32 (mcp_medsam_torch.quantize).
BARS: dict[tuple[str, str], Bar] = {
    ("decoder", "fp32"): Bar("sign_agreement", 0.999),
    ("decoder", "fp16"): Bar("sign_agreement", 0.999),
    ("decoder", "int8"): Bar("sign_agreement", 0.98, real_only=True),
    ("image_encoder", "fp32"): Bar("rel_max_diff", 1e-4),
    ("image_encoder", "fp16"): Bar("rel_max_diff", 5e-2),
    ("clip_image", "fp32"): Bar("rel_max_diff", 1e-4),
    ("clip_image", "fp16"): Bar("rel_max_diff", 5e-2),
}

RANDOM = "random"


def graph_precision(manifest: Manifest, graph: str, backend: str) -> str:
    """The precision a backend runs a graph's file at: ONNX files are always the FP32 graph; an IR
    is INT8 where quantisation kept it so, else float16-stored for fp16 exports, else FP32."""
    if backend == "onnxruntime":
        return "fp32"
    if manifest.raw["graphs"][graph].get("quantization") == "int8":
        return "int8"
    return "fp16" if manifest.precision == "fp16" else "fp32"


def figures(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max |diff|, max |diff| / max |ref| and the share of elements whose sign agrees."""
    diff = float(np.abs(ref - got).max())
    return {"max_abs_diff": diff, "rel_max_diff": diff / max(float(np.abs(ref).max()), 1e-12),
            "sign_agreement": float(np.mean((ref > 0) == (got > 0)))}


class _Reference:
    """The PyTorch modules behind the graphs, called with a graph's feed (inputs by manifest name)."""

    def __init__(self, manifest: Manifest, modules: Mapping[str, nn.Module]) -> None:
        # By the modules' own argument names (the graph inputs' names): a folded graph reads fewer
        # inputs than the PyTorch module it was exported from (the feed carries them all).
        self.inputs = {g: [k for k in inspect.signature(m.forward).parameters] for g, m in modules.items()}
        self.modules = modules

    @torch.no_grad()
    def __call__(self, graph: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        out = self.modules[graph](**{k: torch.from_numpy(feed[k]) for k in self.inputs[graph] if k in feed})
        first = out[0] if isinstance(out, tuple) else out
        return first[:, 0].numpy() if graph == "decoder" else first.numpy()  # decoder: (B, 1, S, S) logits


def _call(engine: Engine, graph: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    if graph == "image_encoder":
        return engine.encode(feed["image"])
    if graph == "clip_image":
        return engine.clip(feed["crops_clip"])
    return engine.decode(feed)[0]


def with_points(feed: dict[str, np.ndarray], manifest: Manifest, rng: np.random.Generator,
                clicks: bool) -> dict[str, np.ndarray]:
    """The feed with the point inputs of a decoder that takes them (else unchanged): one padding point
    per box (the box-only prompt), or (``clicks``) a foreground click at the box centre, a background
    click at a random place and a padding point, so that both paths are judged."""
    if "point_coords" not in manifest.graphs["decoder"].inputs:
        return feed
    boxes = feed["boxes"]
    b = len(boxes)
    if not clicks:
        coords, labels = np.zeros((b, 1, 2), np.float32), np.full((b, 1), -1.0, np.float32)
    else:
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        other = rng.uniform(0, manifest.image_size - 1, (b, 2))
        coords = np.stack([centre, other, np.zeros_like(centre)], axis=1).astype(np.float32)
        labels = np.tile(np.array([[1.0, 0.0, -1.0]], np.float32), (b, 1))
    return {**{k: v for k, v in feed.items() if k not in ("points", "point_labels")},
            "point_coords": coords, "point_labels": labels}


def feeds(manifest: Manifest, ref: _Reference, *, verify_data: Path | None, cases: int,
          max_boxes: int = 4, seed: int = 0) -> dict[str, list[tuple[str, dict[str, np.ndarray]]]]:
    """(label, feed) per graph: real cases (or the synthetic image) and random tensors."""
    rng = np.random.default_rng(seed)
    m = manifest
    s, e, c = m.image_size, m.embedding_size, m.embed_dim
    out: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {g: [] for g in m.graphs}
    slices = [sb for path in (spread_cases(verify_data, cases, alternate_dims=True) or [None])
              for sb in case_slices(path, rng, fractions=(0.5,), max_boxes=max_boxes)]
    for sb in slices:
        x, _ = preprocess.encoder_input(sb.image, s)
        out["image_encoder"].append((sb.tag, {"image": x[None]}))
        emb = ref("image_encoder", {"image": x[None]})
        h, w = sb.image.shape[:2]
        feats = None
        if m.has_clip:
            cc = prompts.content_crops(sb.image, sb.boxes, m.clip_crop_size)
            out["clip_image"].append((sb.tag, {"crops_clip": cc}))
            feats = ref("clip_image", {"crops_clip": cc})
        feed = prompts.decoder_feed(
            embeddings=emb, embedding_index=np.zeros(len(sb.boxes), np.int64),
            boxes=np.stack([prompts.box_to_grid(b, h, w, s) for b in sb.boxes]),
            crops=prompts.content_crops(sb.image, sb.boxes, m.crop_size),
            modality_index=np.full(len(sb.boxes), table_row(m.modality_tokens, sb.token), np.int64),
            clip_features=feats)
        out["decoder"].append((sb.tag, with_points(feed, m, rng, clicks=False)))
        if "point_coords" in m.graphs["decoder"].inputs:
            out["decoder"].append((f"{sb.tag} +clicks", with_points(feed, m, rng, clicks=True)))
    k = 3
    clip_spec = m.graphs["decoder"].inputs.get("clip_image_features")
    clip_features = None if clip_spec is None else rng.normal(0, 1, (k, int(clip_spec.shape[1]))).astype(np.float32)
    out["image_encoder"].append((RANDOM, {"image": rng.random((2, 3, s, s), dtype=np.float32)}))
    out["decoder"].append((RANDOM, with_points(prompts.decoder_feed(
        embeddings=rng.normal(0, 0.1, (2, c, e, e)).astype(np.float32), embedding_index=np.array([0, 1, 1]),
        boxes=np.array([[10, 20, 120, 150], [0, 0, 255, 255], [100, 90, 110, 100]], np.float32) * s / 256,
        crops=rng.random((k, 3, e, e), dtype=np.float32), modality_index=rng.integers(0, len(m.modality_tokens), k),
        clip_features=clip_features), m, rng, clicks=True)))
    if m.has_clip:
        out["clip_image"].append((RANDOM, {"crops_clip": rng.random((2, 3, m.clip_crop_size, m.clip_crop_size),
                                                                    dtype=np.float32)}))
    return out


def verify_folder(folder: Path, modules: Mapping[str, nn.Module], *, verify_data: Path | None = None,
                  cases: int = 3) -> dict[str, Any]:
    """Loads ``folder`` through the runtime and compares every graph with its PyTorch module.

    modules: graph name -> the PyTorch module exported as that graph (inputs in the graph's order).
    Returns ``{graph: {backend: figures + the bar}}`` for the manifest; raises ExportError when a
    graph misses its bar (every failure named) or the folder does not load.
    """
    try:
        manifest = load_manifest(folder)
        backends = ["openvino"] + (["onnxruntime"] if all("onnx" in g.files for g in manifest.graphs.values())
                                   else [])
        engines = {b: Engine(manifest, backend=b) for b in backends}
    except SegmentationError as exc:
        raise ExportError(f"the written folder does not load in the runtime: {exc}") from exc
    ref = _Reference(manifest, modules)
    items = feeds(manifest, ref, verify_data=verify_data, cases=cases)
    report: dict[str, Any] = {}
    failures = []
    log.info(f"{'graph':<14} {'backend':<12} {'input':<44} {'max|diff|':>10} {'rel':>9} {'agree':>9}")
    for graph, graph_items in items.items():
        for backend, engine in engines.items():
            bar = BARS.get((graph, graph_precision(manifest, graph, backend)))
            worst: dict[str, float] = {}
            for label, feed in graph_items:
                f = figures(ref(graph, feed), _call(engine, graph, feed))
                log.info(f"{graph:<14} {backend:<12} {label[:44]:<44} {f['max_abs_diff']:>10.2e} "
                         f"{f['rel_max_diff']:>9.2e} {f['sign_agreement'] * 100:>8.3f}%")
                if bar is not None and bar.real_only and label == RANDOM:
                    continue
                worst = {k: (max if k != "sign_agreement" else min)(worst.get(k, v), v) for k, v in f.items()}
            entry: dict[str, Any] = dict(worst)
            entry["bar"] = str(bar) if bar is not None else "none (INT8: judged by the quantisation's mask Dice)"
            report.setdefault(graph, {})[backend] = entry
            if bar is not None and not bar.met(worst[bar.metric]):
                what = "mask agreement" if graph == "decoder" else bar.metric
                shown = f"{worst[bar.metric]:.4%}" if bar.metric == "sign_agreement" else f"{worst[bar.metric]:.2e}"
                failures.append(f"{graph}/{backend}: {what} {shown} misses the bar {bar}")
    if failures:
        raise ExportError("export verification failed: " + "; ".join(failures))
    return report
