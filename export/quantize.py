"""INT8 post-training quantisation (NNCF) of an exported folder's OpenVINO IR.

``quantize_folder`` rewrites the FP32 IR graphs in place with NNCF FakeQuantize ops (the OpenVINO
CPU plugin runs them as INT8 with VNNI) and returns a report for the manifest. It needs no
PyTorch: the FP32 IR the exporter just wrote is the reference, so the result is plain IR that
``mcp_medsam.engine`` loads unchanged.

Calibration and validation use real cases exactly as the runtime sees them (picked and sliced by
:mod:`mcp_medsam_torch.cases`, as export verification picks them):
- encoder: slices preprocessed by ``mcp_medsam.preprocess.encoder_input`` (2D images; several slices of
  each 3D box, not only the middle one);
- decoder: per-box inputs on FP32 image embeddings, for the given boxes, jittered boxes (up to
  ``jitter`` grid pixels per side, as in training) and propagation-style boxes (the bounding box of
  the FP32 mask plus the manifest's propagation margin, with the crop taken the same way as the
  predictor); crops by ``mcp_medsam.prompts.content_crops``; the case's modality row.
Validation prompts are disjoint from calibration prompts: other slices, other jitter draws and,
where the folder has enough cases, other cases. The metric is the one that matters to a user:
per-box Dice of the ``logit > 0`` masks (on the 256 grid, cropped to the image) of the INT8 chain
(INT8 encoder -> INT8 decoder) against the FP32 chain.

Accuracy control: NNCF's transformer preset quantises both graphs; when the INT8 chain misses the
target on the validation prompts, the image encoder goes back to FP32 (the decoder alone INT8);
when that misses it too, the export fails (report["steps"] lists what was tried).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mcp_medsam import preprocess, prompts
from mcp_medsam.engine import compile_openvino
from mcp_medsam.evaluation.dice import batch_dice
from mcp_medsam.manifest import load_manifest

from .cases import case_slices, spread_cases, table_row
from .config import ExportConfig, ExportError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- prompts from real cases


@dataclass
class SlicePrompts:
    """Boxes on one 2D image or slice: crop boxes in original pixels, prompt boxes on the grid."""

    tag: str
    img: np.ndarray  # (H, W, 3) uint8
    crop_boxes: np.ndarray  # (K, 4) original pixels
    grid_boxes: np.ndarray  # (K, 4) float32 on the image_size grid
    kinds: list[str]
    row: int  # modality row of the decoder's table
    new_hw: tuple[int, int]
    x: np.ndarray | None = None  # encoder input (3, S, S)
    emb: np.ndarray | None = None  # FP32 embedding (C, E, E)


# ---------------------------------------------------------------- running IR


class IR:
    """An OpenVINO model (``openvino.Model``) compiled as the runtime compiles it; returns output 0."""

    def __init__(self, model: Any) -> None:
        self.compiled = compile_openvino(model)
        self.req = self.compiled.create_infer_request()
        # Every name of each input: an input can carry a second tensor name (point_labels: /Cast_output_0),
        # and get_any_name() may return that one.
        self.names = set().union(*(p.get_names() for p in self.compiled.inputs))

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        self.req.infer({k: v for k, v in feed.items() if k in self.names})
        return self.req.get_output_tensor(0).data.copy()


def _decoder_feed(emb: np.ndarray, sp: SlicePrompts, crop_size: int, idx: slice | None = None) -> dict[str, np.ndarray]:
    cb, gb = sp.crop_boxes, sp.grid_boxes
    if idx is not None:
        cb, gb = cb[idx], gb[idx]
    # Box prompts only; a graph that takes clicks reads one padding point per box, one without them
    # never reads those names (IR and the split chains feed by each graph's own input names).
    return {**prompts.decoder_feed(embeddings=emb[None], embedding_index=np.zeros(len(gb), np.int64), boxes=gb,
                                   crops=prompts.content_crops(sp.img, cb, crop_size),
                                   modality_index=np.full(len(gb), sp.row, np.int64)),
            **prompts.padding_points(len(gb))}


def _decode_all(dec: Callable, emb: np.ndarray, sp: SlicePrompts, crop_size: int, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(sp.grid_boxes), batch):
        out.append(dec(_decoder_feed(emb, sp, crop_size, slice(i, i + batch))))
    return np.concatenate(out)[:, 0]


def mask_dice(ref: np.ndarray, got: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Per-box Dice (B,) of the logit > 0 masks of (B, S, S) logits inside the resized image region
    (the padding left out); 1 when both are empty."""
    nh, nw = new_hw
    return batch_dice(ref[:, :nh, :nw] > 0, got[:, :nh, :nw] > 0)


# ---------------------------------------------------------------- datasets


@dataclass
class Data:
    calib: list[SlicePrompts] = field(default_factory=list)
    val: list[SlicePrompts] = field(default_factory=list)
    seconds: float = 0.0


def build_data(folder: Path | None, n_cases: int, enc: IR, dec: IR, *, tokens: tuple[str, ...], image_size: int,
               crop_size: int, margin: int, jitter: int = 5, max_boxes: int = 4, n_val_cases: int = 8,
               seed: int = 0) -> Data:
    """Calibration and validation prompts with FP32 embeddings (see the module doc)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    s = image_size
    order = spread_cases(folder, -1)
    calib_files: list[Path | None] = list(order[:n_cases]) or [None]
    # Validation: the next cases in the modality spread (held out), else other slices/draws of the same.
    val_files: list[Path | None] = list(order[n_cases:n_cases + n_val_cases])
    if len(val_files) < n_val_cases:
        val_files += calib_files[: n_val_cases - len(val_files)]
    data = Data()
    for files, target, fracs in ((calib_files, data.calib, (0.5, 0.2, 0.8, 0.35, 0.65)),
                                 (val_files, data.val, (0.45, 0.1, 0.9, 0.3, 0.7))):
        for path in files:
            for sb in case_slices(path, rng, fractions=fracs, max_boxes=max_boxes):
                tag, img, boxes, row = sb.tag, sb.image, sb.boxes, table_row(tokens, sb.token)
                h, w = img.shape[:2]
                x, new_hw = preprocess.encoder_input(img, s)
                emb = enc({"image": x[None]})[0]
                given = SlicePrompts(tag, img, boxes.astype(np.int64),
                                     np.stack([prompts.box_to_grid(b, h, w, s) for b in boxes]),
                                     ["given"] * len(boxes), row, new_hw, x, emb)
                logits = _decode_all(dec, emb, given, crop_size, 8)
                crops, grids, kinds = [], [], []
                for b, lg in zip(boxes, logits):
                    crops.append(b)
                    grid = prompts.box_to_grid(b, h, w, s)
                    grids.append(grid)
                    kinds.append("given")
                    # Shifts both ways (inward too): calibration sees loose and tight boxes.
                    g, c = prompts.jitter_box(grid, b, rng.integers(-jitter, jitter + 1, 4), hw=(h, w), size=s)
                    crops.append(c)
                    grids.append(g)
                    kinds.append("jitter")
                    mask = preprocess.postprocess_logits(lg, new_hw, (h, w))
                    if mask.any():
                        c, g = prompts.propagated_prompt(mask, new_hw, s, margin)
                        crops.append(c)
                        grids.append(g)
                        kinds.append("propagated")
                target.append(SlicePrompts(tag, img, np.stack(crops).astype(np.int64),
                                           np.stack(grids).astype(np.float32), kinds, row, new_hw, x, emb))
    data.seconds = time.perf_counter() - t0
    return data


def encoder_items(prompts: list[SlicePrompts]) -> list[dict[str, np.ndarray]]:
    return [{"image": sp.x[None]} for sp in prompts]


def decoder_items(prompts: list[SlicePrompts], crop_size: int, batch: int = 8) -> list[dict[str, np.ndarray]]:
    items = []
    for sp in prompts:
        for i in range(0, len(sp.grid_boxes), batch):
            items.append(_decoder_feed(sp.emb, sp, crop_size, slice(i, i + batch)))
    return items


# ---------------------------------------------------------------- validation


def chain_logits(enc: Callable | None, dec: Callable, prompts: list[SlicePrompts], crop_size: int,
                 batch: int = 8) -> list[np.ndarray]:
    """Decoder logits per slice; with enc, the embedding is recomputed by enc (the INT8 chain),
    else the stored FP32 embedding is used (the decoder alone)."""
    out = []
    for sp in prompts:
        emb = enc({"image": sp.x[None]})[0] if enc is not None else sp.emb
        out.append(_decode_all(dec, emb, sp, crop_size, batch))
    return out


def dice_report(ref: list[np.ndarray], got: list[np.ndarray], prompts: list[SlicePrompts]) -> dict[str, Any]:
    per = [mask_dice(r, g, sp.new_hw) for r, g, sp in zip(ref, got, prompts)]
    d = np.concatenate(per)
    kinds = np.concatenate([np.array(sp.kinds) for sp in prompts])
    return {"mean_dice": float(d.mean()), "min_dice": float(d.min()), "boxes": int(len(d)),
            "by_kind": {str(k): round(float(d[kinds == k].mean()), 4) for k in dict.fromkeys(kinds)},
            "worst": sorted(((round(float(x), 3), str(sp.tag)) for x, sp in
                             zip([p.min() for p in per], prompts)))[:3]}


# ---------------------------------------------------------------- the export step


def _nncf_quantize(model: Any, items: list[dict[str, np.ndarray]]) -> Any:
    """Transformer recipe without SmoothQuant: in our measurements SmoothQuant made the TinyViT
    embeddings worse (relative error 0.18 vs 0.13), not better."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER,
                         advanced_parameters=AdvancedQuantizationParameters(
                             smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))


@dataclass
class Quantization:
    """What :func:`quantize_folder` did: the manifest's ``quantization`` report and, per graph, what
    it became (``int8`` or ``fp32 (accuracy control)``)."""

    report: dict[str, Any]
    graphs: dict[str, str]


def quantize_folder(folder: Path, cfg: ExportConfig) -> Quantization:
    """Quantises the FP32 image_encoder and decoder IR of the exported ``folder`` (manifest written) in place.

    Accuracy control: the INT8 chain (INT8 encoder -> INT8 decoder) is judged by per-box mask
    Dice against the FP32 chain on validation prompts. Below ``cfg.int8_target_dice`` the encoder
    goes back to FP32 (it is the more sensitive graph and gains least: 2x vs 3x for the decoder);
    below it again the export fails (ExportError). A model with a CLIP image tower is refused: its
    decoder takes CLIP features that calibration would have to compute.
    """
    import nncf
    import openvino as ov

    nncf.set_log_level(40)
    target_dice = cfg.int8_target_dice
    manifest = load_manifest(folder)
    if manifest.has_clip:
        raise ExportError("int8 export of a model with a CLIP image tower is not supported yet: its decoder "
                          "takes CLIP features that calibration would have to compute; export fp32/fp16 instead")
    xml = {g: manifest.graph_file(g, "openvino") for g in ("image_encoder", "decoder")}
    core = ov.Core()
    fp32 = {g: core.read_model(str(p)) for g, p in xml.items()}
    enc32, dec32 = IR(fp32["image_encoder"]), IR(fp32["decoder"])
    crop_size = manifest.crop_size
    log.info(f"int8: building calibration/validation prompts from {cfg.verify_data or 'a synthetic image'}")
    data = build_data(cfg.verify_data, cfg.calibration_cases, enc32, dec32, tokens=manifest.modality_tokens,
                      image_size=manifest.image_size, crop_size=crop_size, margin=manifest.propagation_margin)
    n_cal = sum(len(sp.kinds) for sp in data.calib)
    n_val = sum(len(sp.kinds) for sp in data.val)
    log.info(f"int8: {len(data.calib)} calibration slices / {n_cal} boxes, {len(data.val)} validation slices / "
             f"{n_val} boxes ({data.seconds:.0f} s)")
    t0 = time.perf_counter()
    q_enc = _nncf_quantize(fp32["image_encoder"], encoder_items(data.calib))
    q_dec = _nncf_quantize(fp32["decoder"], decoder_items(data.calib, crop_size))
    t_quant = time.perf_counter() - t0
    ref = chain_logits(None, dec32, data.val, crop_size)
    dec8 = IR(q_dec)
    steps = []
    chosen = None
    for label, enc in (("encoder int8 + decoder int8", IR(q_enc)), ("encoder fp32 + decoder int8", None)):
        rep = dice_report(ref, chain_logits(enc, dec8, data.val, crop_size), data.val)
        rep["config"] = label
        steps.append(rep)
        log.info(f"int8: {label}: mean box Dice vs FP32 {rep['mean_dice']:.4f} (min {rep['min_dice']:.3f}, "
                 f"by kind {rep['by_kind']}) target {target_dice}")
        if rep["mean_dice"] >= target_dice:
            chosen = label
            break
    if chosen is None:
        raise ExportError(f"int8 quantisation misses the accuracy target: mean box Dice vs FP32 "
                          f"{steps[-1]['mean_dice']:.4f} < {target_dice} even with the encoder in FP32")
    quantized = {"decoder": q_dec, **({"image_encoder": q_enc} if chosen.startswith("encoder int8") else {})}
    for g, m in quantized.items():
        # The FP32 .bin is memory-mapped by read_model (and shared by the quantised model's
        # constants): write beside it and rename, never truncate it in place (SIGBUS).
        tmp_xml = xml[g].with_name(f"{g}.int8.xml")
        ov.save_model(m, str(tmp_xml), compress_to_fp16=False)
        tmp_xml.with_suffix(".bin").replace(xml[g].with_suffix(".bin"))
        tmp_xml.replace(xml[g])
    report = {"method": "nncf.quantize (PTQ, transformer preset, no SmoothQuant), per-tensor activations",
              "nncf": nncf.__version__, "calibration_boxes": n_cal, "validation_boxes": n_val,
              "calibration_cases": [sp.tag for sp in data.calib], "seconds": round(t_quant, 1),
              "target_dice": target_dice, "result": chosen, "steps": steps}
    return Quantization(report, {g: "int8" if g in quantized else "fp32 (accuracy control)" for g in xml})
