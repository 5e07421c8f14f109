"""Faster precisions that keep the masks: layer groups, their sensitivity, the mix, the variants.

Works on an exported folder's OpenVINO IR (no PyTorch): ``mcp-medsam variants DIR --data CASES``.

1. **Groups.** Every op of the two graphs belongs to a layer group, by the module path in its name
   (:data:`ENCODER_RULES`, :data:`DECODER_RULES`): the encoder's patch embedding, the MBConv blocks,
   each patch merging, each attention block (windowed attention and local conv), each MLP, the
   neck; the decoder's prompt encoding, each crop-CNN block, each two-way transformer layer and the
   final attention, the F4 blocks (modality FiLM, content, fuse), the upscaling with the hypernetwork
   MLPs, the IoU/category heads. Unnamed ops (layer norms, converts) take their consumer's group.
2. **Sensitivity** (:func:`sensitivity`): each group alone in INT8, and in bf16 on CPUs with bf16,
   the rest FP32; per-box mask Dice against the FP32 chain on held-out prompts (given, jittered and
   propagation-style boxes; 2D images and slices of 3D cases).
3. **The mix** (:func:`build_variants`): the most sensitive groups stay FP32, one more at a time
   in the measured order, until the variant holds the bars in :data:`BARS` on the held-out cases
   through the whole runtime pipeline (3D: the propagation chain run in the variant), and the
   sample-set DSC is within :data:`BARS` of FP32's. INT8 keeps groups FP32 with NNCF's ignored
   scope. bf16 cannot be switched per op in OpenVINO's CPU plugin (a matmul's "keep precision"
   mark is lost when it becomes a FullyConnected node), so a bf16 variant is a graph split: a
   chain of IR segments, each compiled with its own precision hint (:func:`split_graph`).
4. **The variants** go into the folder (new files only; the FP32 files stay byte-identical) with
   their measured agreement in the manifest (``variants``); ``--precision auto`` runs them.

Calibration (INT8) and the held-out cases are disjoint: the first ``calibration_cases`` cases of
the modality spread (:func:`mcp_medsam_torch.cases.spread_cases`) calibrate, the others judge.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mcp_medsam.engine import Engine, SegmentSpec, chain_runner, compile_openvino, cpu_features
from mcp_medsam.evaluation.agreement import BoxMasks, box_agreement, box_masks
from mcp_medsam.evaluation.dice import batch_dice
from mcp_medsam.io.atomic import write_json
from mcp_medsam.manifest import MANIFEST_NAME, bundled_weights, file_records, load_manifest
from mcp_medsam.segmenter import Segmenter

from .cases import spread_cases
from .config import ExportError, swap_in
from .quantize import IR, Data, SlicePrompts, build_data, chain_logits, decoder_items, dice_report, encoder_items

log = logging.getLogger(__name__)

GRAPHS = ("image_encoder", "decoder")

# The bars a variant is held to against FP32 (issue 13), in one place.
BARS = {"2d_box_dice": 0.98, "3d_box_slice_dice": 0.97, "dsc_points": 0.3}

METHODS = {"bf16": "graph split: f32 and bf16 segments, one OpenVINO precision hint each",
           "int8": "nncf.quantize (PTQ, transformer preset, no SmoothQuant), the f32 groups as its ignored scope"}

# Mixes found by the study (README "Faster precisions"): the groups kept FP32 per graph ("*": all of it).
MIXES = {"bf16": {"image_encoder": ["*"], "decoder": ["prompt", "transformer.0", "transformer.1"]}}



def parse_mix(items: Sequence[str], precisions: Sequence[str]) -> dict[str, list[str]] | None:
    """``--mix`` values: ``GRAPH:GROUP`` (``GRAPH:*`` the whole graph) kept FP32, or ``found`` (the
    study's mix, :data:`MIXES`, for the one precision asked); none: None (search the mixes)."""
    if not items:
        return None
    if list(items) == ["found"]:
        if len(precisions) != 1 or precisions[0] not in MIXES:
            raise ExportError(f"--mix found is known for {', '.join(MIXES)} alone (pass --precision bf16)")
        return {g: list(v) for g, v in MIXES[precisions[0]].items()}
    mix: dict[str, list[str]] = {}
    for item in items:
        graph, _, group = item.partition(":")
        if graph not in GRAPHS or not group:
            raise ExportError(f"--mix {item!r}: expected GRAPH:GROUP with GRAPH one of {', '.join(GRAPHS)}, or 'found'")
        mix.setdefault(graph, []).append(group)
    return mix

# CPU features each variant needs to be faster than FP32 (mcp_medsam.engine.CpuFeatures.has).
REQUIRES = {"bf16": ["BF16"], "int8": ["VNNI"]}

# (regex on the op's friendly name, group name template): the first match names the group. The
# names are the exporter's module paths (torch.onnx scope names), the same for every model size.
ENCODER_RULES: list[tuple[str, str]] = [
    (r"^/encoder/patch_embed/", "patch_embed"),
    (r"^/encoder/layers\.(\d+)/downsample/", "merge.{0}"),
    (r"^/encoder/layers\.0/blocks\.(\d+)/", "mbconv.{0}"),
    (r"^/encoder/layers\.(\d+)/blocks\.(\d+)/(?:mlp/|Add_1$)", "mlp.{0}.{1}"),
    (r"^/encoder/layers\.(\d+)/blocks\.(\d+)/", "attn.{0}.{1}"),
    (r"^/encoder/(?:neck/|Reshape$|Transpose$)", "neck"),
]
DECODER_RULES: list[tuple[str, str]] = [
    (r"^/crop_nets/(conv\d*)/", "crop.{0}"),
    (r"^/mask_decoder/transformer/layers\.(\d+)/", "transformer.{0}"),
    (r"^/mask_decoder/transformer/", "transformer.final"),
    (r"^/mask_decoder/(?:w_lin|b_lin|m_conv)/", "f4.modality"),
    (r"^/mask_decoder/c_conv/", "f4.content"),
    (r"^/mask_decoder/(?:conv1|convs)/", "f4.fuse"),
    (r"^/mask_decoder/(?:output_upscaling|output_hypernetworks_mlps)/|^/mask_decoder/(?:MatMul|Reshape_3)$",
     "upscaling"),
    (r"^/mask_decoder/(?:iou_prediction_head|category_prediction_head)/", "heads"),
    (r"^/(?:pe_layer/|[A-Za-z])", "prompt"),
]
RULES = {"image_encoder": ENCODER_RULES, "decoder": DECODER_RULES}
NO_MASK_EFFECT = {"heads"}  # groups whose outputs never reach the masks: not studied


# ---------------------------------------------------------------- groups of ops


class GraphOps:
    """The ops of one IR graph and the layer group of each (``label``: friendly name -> group, None
    for the graph's inputs and outputs); ``const``: ops on a constant path (weights and their converts),
    which belong to whichever segment reads them."""

    def __init__(self, model: Any, rules: list[tuple[str, str]]) -> None:
        self.ops = list(model.get_ordered_ops())
        self.names = [op.get_friendly_name() for op in self.ops]
        if len(set(self.names)) != len(self.names):
            raise ExportError("the graph has ops with the same name: groups cannot be told apart")
        compiled = [(re.compile(rx), name) for rx, name in rules]
        self.const: set[str] = set()
        label: dict[str, str | None] = {}
        for op, name in zip(self.ops, self.names):
            kind = op.get_type_name()
            if kind == "Constant" or (kind not in ("Parameter", "ShapeOf") and op.get_input_size() > 0 and all(
                    v.get_node().get_friendly_name() in self.const for v in op.input_values())):
                self.const.add(name)
            label[name] = next((tmpl.format(*m.groups()) for rx, tmpl in compiled for m in [rx.search(name)] if m),
                               None)
        io = {"Parameter", "Result"}
        # Unnamed ops (layer norms, glue) take the group of their first grouped consumer, else of
        # their first grouped producer.
        for op, name in zip(reversed(self.ops), reversed(self.names)):
            if label[name] is None and name not in self.const and op.get_type_name() not in io:
                label[name] = next((label[c] for c in self._consumers(op) if label.get(c)), None)
        for op, name in zip(self.ops, self.names):
            if label[name] is None and name not in self.const and op.get_type_name() not in io:
                label[name] = next((label[v.get_node().get_friendly_name()] for v in op.input_values()
                                    if label.get(v.get_node().get_friendly_name())), None)
        self.label = label
        self.groups = list(dict.fromkeys(g for n, g in label.items() if g is not None and n not in self.const))

    @staticmethod
    def _consumers(op: Any) -> list[str]:
        return [t.get_node().get_friendly_name() for out in op.outputs() for t in out.get_target_inputs()]

    def compute_ops(self) -> list[str]:
        """Names of the ops that compute at run time (not constants, inputs or outputs), in order."""
        return [n for op, n in zip(self.ops, self.names)
                if n not in self.const and op.get_type_name() not in ("Parameter", "Result")]

    def ops_of(self, groups: set[str]) -> list[str]:
        return [n for n in self.compute_ops() if self.label[n] in groups]


# ---------------------------------------------------------------- bf16: a graph split into segments


@dataclass
class Segment:
    """One piece of a split graph: an ``openvino.Model``, its hint and its tensor names."""

    model: Any
    hint: str
    inputs: list[str]
    outputs: list[str]


def _tensor_key(node_name: str, port: int) -> str:
    return f"{node_name}:{port}".replace(",", "_")  # IR port names are comma-separated lists


def plan_segments(ops: GraphOps, low: set[str]) -> list[tuple[str, list[str]]]:
    """(hint, op names) per segment, in run order: ops of the groups in ``low`` bf16, the others f32.

    Greedy in graph order: a segment takes every op of its precision whose inputs are ready, so the
    segments alternate between f32 and bf16 and a chain-shaped graph gets the fewest cuts."""
    prec = {n: ("bf16" if ops.label[n] in low else "f32") for n in ops.compute_ops()}
    producers = {n: [v.get_node().get_friendly_name() for v in op.input_values()]
                 for op, n in zip(ops.ops, ops.names) if n in prec}
    remaining = list(prec)
    done: set[str] = set()
    plan = []
    while remaining:
        hint = prec[remaining[0]]
        taken: list[str] = []
        taken_set: set[str] = set()
        for n in remaining:
            if prec[n] == hint and all(p in done or p in taken_set or p not in prec for p in producers[n]):
                taken.append(n)
                taken_set.add(n)
        done |= taken_set
        remaining = [n for n in remaining if n not in taken_set]
        plan.append((hint, taken))
    return plan


def split_graph(xml: Path, rules: list[tuple[str, str]], low: set[str]) -> list[Segment]:
    """The IR graph ``xml`` as a chain of segments: the groups in ``low`` run bf16, the rest f32.

    Each segment is cut from a fresh read of the IR: inputs from earlier segments become Parameters
    named ``producer:port``, tensors later segments (or the graph's outputs) need become Results.
    One segment covering the whole graph is the graph itself (the IR file as it is)."""
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()
    graph = GraphOps(core.read_model(str(xml)), rules)
    plan = plan_segments(graph, low)
    segments = []
    for hint, names in plan:
        model = core.read_model(str(xml))
        byname = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        members = set(names)
        params: dict[str, Any] = {}
        inputs: list[str] = []
        for n in names:
            op = byname[n]
            for i, src in enumerate(op.input_values()):
                node = src.get_node()
                pname = node.get_friendly_name()
                if pname in members or pname in graph.const:
                    continue
                if node.get_type_name() == "Parameter":
                    # The graph input's own name: a no-op cast in the export can add a second tensor
                    # name (e.g. point_labels also named /Cast_output_0) that no feed carries.
                    key = node.get_friendly_name() if node.get_friendly_name() in src.get_names() \
                        else src.get_any_name()
                    params.setdefault(key, node)
                else:
                    key = _tensor_key(pname, src.get_index())
                    if key not in params:
                        p = ops.parameter(src.get_partial_shape(), src.get_element_type(), name=key)
                        p.output(0).get_tensor().set_names({key})
                        params[key] = p
                    op.input(i).replace_source_output(params[key].output(0))
                if key not in inputs:
                    inputs.append(key)
        results, outputs = [], []
        for n in names:
            op = byname[n]
            for out in op.outputs():
                targets = [t.get_node() for t in out.get_target_inputs()]
                for t in targets:
                    if t.get_type_name() == "Result":
                        results.append(t)
                        outputs.append(out.get_any_name())
                if any(t.get_type_name() != "Result" and t.get_friendly_name() not in members
                       and t.get_friendly_name() not in graph.const for t in targets):
                    key = _tensor_key(n, out.get_index())
                    out.get_tensor().add_names({key})
                    results.append(ops.result(out))
                    outputs.append(key)
        sub = ov.Model(results, list(params.values()), f"{xml.stem}.{len(segments)}")
        segments.append(Segment(sub, hint, inputs, outputs))
    return segments


def graph_runner(segments: list[Segment], graph_outputs: list[str], *, threads: int | None = None) -> Callable:
    """In-memory segments compiled as the runtime compiles a variant's files, run as the runtime runs
    them (:func:`mcp_medsam.engine.chain_runner`): feed -> the graph's outputs."""
    specs = [SegmentSpec(f"segment-{i}", s.hint, tuple(s.inputs), tuple(s.outputs)) for i, s in enumerate(segments)]
    compiled = [compile_openvino(s.model, precision_hint=s.hint, threads=threads) for s in segments]
    return chain_runner(compiled, specs, graph_outputs)


def whole(model: Any, manifest: Any, graph: str) -> list[Segment]:
    """An in-memory model of a whole graph (an INT8 one) as a chain of one f32 segment."""
    spec = manifest.graphs[graph]
    return [Segment(model, "f32", list(spec.inputs), list(spec.outputs))]


class ChainIR:
    """:func:`graph_runner` returning output 0 (as :class:`mcp_medsam_torch.quantize.IR`, for the study)."""

    def __init__(self, segments: list[Segment], graph_outputs: list[str], *, threads: int | None = None) -> None:
        self.run = graph_runner(segments, graph_outputs, threads=threads)

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.run(feed)[0]


# ---------------------------------------------------------------- INT8: NNCF with ignored scopes


def quantize_graph(model: Any, items: list[dict[str, np.ndarray]], *, ignored: Sequence[str] = (),
                   study: bool = False) -> Any:
    """NNCF PTQ as :func:`mcp_medsam_torch.quantize._nncf_quantize` (transformer preset, no SmoothQuant),
    with the ops ``ignored`` left in FP32. ``study``: no bias correction and weights kept as FakeQuantize,
    so that :func:`only_group` can strip every group's quantizers but one and leave the rest FP32 exactly."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    nncf.set_log_level(logging.ERROR)
    advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    if study:
        advanced.disable_bias_correction = True
        advanced.backend_params = {"compress_weights": False}
    kwargs: dict[str, Any] = {}
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored), validate=False)
    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER,
                         advanced_parameters=advanced, **kwargs)


def only_group(quantized: Any, ops: GraphOps, group: str) -> Any:
    """A copy of a :func:`quantize_graph` ``study`` model with the quantizers of every group but ``group``
    bypassed (a quantizer belongs to the groups of the ops that read it)."""
    model = quantized.clone()
    for fq in [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]:
        readers = [ops.label.get(t.get_node().get_friendly_name()) for t in fq.output(0).get_target_inputs()]
        if group not in readers:
            for t in list(fq.output(0).get_target_inputs()):
                t.replace_source_output(fq.input_value(0))
    model.validate_nodes_and_infer_types()
    return model


# ---------------------------------------------------------------- sensitivity


@dataclass
class StudyRow:
    """One group alone at one precision: per-box Dice on held-out prompts (``mean_dice``, ``min_dice``,
    ``by_kind``, ``boxes``) and per box-slice Dice of 3D propagation chains (``chain_dice`` over
    ``chain_slices``; NaN when not measured)."""

    precision: str
    graph: str
    group: str
    mean_dice: float
    min_dice: float
    by_kind: dict[str, float]
    boxes: int
    chain_dice: float = float("nan")
    chain_slices: int = 0

    @property
    def key(self) -> float:
        """What ranks the groups: the worse of the two measures (chains carry a slice's error along)."""
        return min(self.mean_dice, self.chain_dice) if self.chain_dice == self.chain_dice else self.mean_dice


@dataclass
class Chain:
    """A short 3D propagation chain of a calibration case: ``slices`` (D, H, W) uint8 around its first
    box's middle slice, that box on them (1, 6), the FP32 chain's masks (D, H, W) bool and the FP32
    slice embeddings (so that a decoder variant reuses them)."""

    tag: str
    volume: np.ndarray
    box: np.ndarray
    token: str
    ref: np.ndarray | None = None
    cache: Any = None


def chains_of(paths: list[Path], slices: int) -> list[Chain]:
    """One :class:`Chain` of up to ``slices`` slices per 3D case of ``paths``."""
    from mcp_medsam.io.npz import load_case
    from mcp_medsam.modality import modality_token

    out = []
    for path in paths:
        case = load_case(path)
        if not case.is_3d:
            continue
        x0, y0, z0, x1, y1, z1 = (int(v) for v in case.boxes[0])
        lo = max(z0, (z0 + z1) // 2 - slices // 2)
        hi = min(z1, lo + slices - 1)
        out.append(Chain(f"{path.name}[z={lo}..{hi}]", case.image[lo:hi + 1],
                         np.array([[x0, y0, 0, x1, y1, hi - lo]]), modality_token(path.name)))
    return out


def chain_dice(seg: Segmenter, chain: Chain, *, reuse: bool) -> np.ndarray:
    """Per-slice Dice (D,) of ``seg``'s propagation chain against FP32's; ``reuse``: FP32's slice
    embeddings (a variant whose encoder is FP32)."""
    cache = chain.cache if reuse else seg.slice_cache(len(chain.volume))
    got = seg.segment_volume(chain.volume, chain.box, chain.token, cache=cache) > 0
    return batch_dice(chain.ref, got)


def study_prompts(val: list[SlicePrompts], max_slices: int, max_given: int = 2) -> list[SlicePrompts]:
    """Up to ``max_slices`` validation slices, spread over the cases (round-robin by case), each with
    the given and propagation-style prompts of at most ``max_given`` of its boxes (jittered ones left
    out: the study runs one variant per group, so it must stay small)."""
    by_case: dict[str, list[SlicePrompts]] = {}
    for sp in val:
        by_case.setdefault(sp.tag.split("[")[0], []).append(sp)
    flat = [q for q in by_case.values() if "[z=" not in q[0].tag]
    deep = [q for q in by_case.values() if "[z=" in q[0].tag]
    # 2D and 3D cases alternate, so that a few slices already hold both (and the propagation-style boxes of 3D)
    queues = [q for pair in zip_longest(flat, deep) for q in pair if q is not None]
    out: list[SlicePrompts] = []
    while queues and len(out) < max_slices:
        for q in queues:
            if q and len(out) < max_slices:
                # 3D: the middle of the list first (the slices near where inference starts), then outwards.
                out.append(_trim(q.pop(len(q) // 2), max_given))
        queues = [q for q in queues if q]
    return out


def _trim(sp: SlicePrompts, max_given: int) -> SlicePrompts:
    keep, given = [], 0
    for i, kind in enumerate(sp.kinds):
        given += kind == "given"
        if given <= max_given and kind != "jitter":
            keep.append(i)
    return SlicePrompts(sp.tag, sp.img, sp.crop_boxes[keep], sp.grid_boxes[keep], [sp.kinds[i] for i in keep],
                        sp.row, sp.new_hw, sp.x, sp.emb)


def sensitivity(folder: Path, data: Data, *, precisions: Sequence[str], max_slices: int = 4,
                chains: list[Chain] | None = None, threads: int | None = None,
                groups: dict[str, list[str]] | None = None) -> list[StudyRow]:
    """Each group alone at each precision (plus ``all``: the whole graph), the rest FP32, against FP32:
    per-box mask Dice on :func:`study_prompts` of ``data.val``, and per box-slice Dice of the 3D
    propagation ``chains`` (decoder groups: every chain, on FP32's slice embeddings; encoder groups:
    the chain the whole encoder at that precision agrees least on). INT8: one NNCF pass per graph on
    ``data.calib``, its quantizers kept for one group at a time."""
    import openvino as ov

    manifest = load_manifest(folder)
    crop = manifest.crop_size
    core = ov.Core()
    xml = {g: manifest.graph_file(g, "openvino") for g in GRAPHS}
    fp32 = {g: core.read_model(str(p)) for g, p in xml.items()}
    gops = {g: GraphOps(fp32[g], RULES[g]) for g in GRAPHS}
    outputs = {g: list(manifest.graphs[g].outputs) for g in GRAPHS}
    run32 = {g: graph_runner(whole(fp32[g], manifest, g), outputs[g], threads=threads) for g in GRAPHS}
    dec32 = _first(run32["decoder"])
    prompts = study_prompts(data.val, max_slices)
    chains = list(chains or [])
    log.info(f"sensitivity: {len(prompts)} slices, {sum(len(sp.kinds) for sp in prompts)} boxes "
             f"({', '.join(sorted({sp.tag for sp in prompts}))}); chains: {', '.join(c.tag for c in chains) or 'none'}")
    ref = chain_logits(None, dec32, prompts, crop)
    seg32 = Segmenter(Engine.of_runners(manifest, run32, precision="fp32"))
    for ch in chains:
        ch.cache = seg32.slice_cache(len(ch.volume))
        ch.ref = seg32.segment_volume(ch.volume, ch.box, ch.token, cache=ch.cache) > 0
    rows: list[StudyRow] = []
    for precision in precisions:
        quantized = {}
        if precision == "int8":
            t0 = time.perf_counter()
            quantized = {"image_encoder": quantize_graph(fp32["image_encoder"], encoder_items(data.calib), study=True),
                         "decoder": quantize_graph(fp32["decoder"], decoder_items(data.calib, crop), study=True)}
            log.info(f"sensitivity: int8 calibration {time.perf_counter() - t0:.0f} s")
        for g in GRAPHS:
            other = next(x for x in GRAPHS if x != g)
            names = (groups or {}).get(g) or [x for x in gops[g].groups if x not in NO_MASK_EFFECT]
            worst: list[Chain] = chains
            for group in ["all", *names]:
                t0 = time.perf_counter()
                if precision == "int8":
                    q = quantized[g] if group == "all" else only_group(quantized[g], gops[g], group)
                    segments = whole(q, manifest, g)
                else:
                    segments = split_graph(xml[g], RULES[g], set(gops[g].groups) if group == "all" else {group})
                runner = graph_runner(segments, outputs[g], threads=threads)
                got = (chain_logits(_first(runner), dec32, prompts, crop) if g == "image_encoder"
                       else chain_logits(None, _first(runner), prompts, crop))
                rep = dice_report(ref, got, prompts)
                seg = Segmenter(Engine.of_runners(manifest, {g: runner, other: run32[other]}, precision=precision))
                per_chain = [chain_dice(seg, ch, reuse=g == "decoder") for ch in worst]
                if g == "image_encoder" and group == "all" and chains:
                    # Re-encoding every chain per group is the study's dearest part: one chain, the most sensitive.
                    worst = [chains[int(np.argmin([d.mean() for d in per_chain]))]]
                d = np.concatenate(per_chain) if per_chain else np.zeros(0)
                on_chains = round(float(d.mean()), 5) if len(d) else float("nan")
                rows.append(StudyRow(precision, g, group, round(rep["mean_dice"], 5), round(rep["min_dice"], 4),
                                     rep["by_kind"], rep["boxes"], on_chains, int(len(d))))
                log.info(f"sensitivity: {precision:<5} {g:<14} {group:<18} mean Dice {rep['mean_dice']:.4f} "
                         f"min {rep['min_dice']:.3f}, chains {rows[-1].chain_dice:.4f} over {len(d)} box-slices "
                         f"({time.perf_counter() - t0:.0f} s)")
    return rows


def _first(runner: Callable) -> Callable:
    return lambda feed: runner(feed)[0]


def format_study(rows: list[StudyRow]) -> str:
    """The sensitivity table (markdown): per group and precision, the Dice against FP32 when that group
    alone runs at that precision: per box (mean and min) and per 3D chain box-slice (mean, how many)."""
    precisions = list(dict.fromkeys(r.precision for r in rows))
    table: dict[tuple[str, str], dict[str, StudyRow]] = {}
    for r in rows:
        table.setdefault((r.graph, r.group), {})[r.precision] = r
    head = "| graph | group | " + " | ".join(f"{p}: boxes mean (min) | {p}: 3D chains" for p in precisions) + " |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(precisions))]
    for (graph, group), by in table.items():
        cells = [f"{by[p].mean_dice:.4f} ({by[p].min_dice:.3f}) | " + (
            f"{by[p].chain_dice:.4f} ({by[p].chain_slices})" if by[p].chain_slices else "-") if p in by else "- | -"
            for p in precisions]
        lines.append(f"| {graph} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- whole-pipeline agreement


@dataclass
class CaseSet:
    """The cases a variant is judged on: ``validation`` (never used for calibration) and ``all``
    (every case of the folder with ground truth, for the DSC bar)."""

    calibration: list[Path]
    validation: list[Path]
    all: list[Path]
    gts: Path | None


def case_set(data_dir: Path, calibration_cases: int, gts: Path | None) -> CaseSet:
    order = spread_cases(data_dir, -1)
    if len(order) <= calibration_cases:
        raise ExportError(f"{data_dir}: {len(order)} cases; the variants need more than --calibration-cases "
                          f"({calibration_cases}) so that some are held out for validation")
    if gts is None and (data_dir.parent / "gts").is_dir():
        gts = data_dir.parent / "gts"
    return CaseSet(order[:calibration_cases], order[calibration_cases:], sorted(order), gts)


class Reference:
    """FP32 per-box masks of every case, computed once (kept in ``work`` between runs, keyed by the
    folder's FP32 graph hashes)."""

    def __init__(self, seg: Segmenter, work: Path | None) -> None:
        self.seg = seg
        self.work = work / f"fp32-{seg.engine.weights_key}" if work is not None else None
        self.masks: dict[str, BoxMasks] = {}

    def __call__(self, path: Path) -> BoxMasks:
        if path.name not in self.masks:
            cached = self.work / f"{path.name}.json" if self.work is not None else None
            if cached is not None and cached.is_file():
                self.masks[path.name] = _read_masks(cached)
            else:
                self.masks[path.name] = box_masks(self.seg, path)
                if cached is not None:
                    _write_masks(cached, self.masks[path.name])
        return self.masks[path.name]


def _write_masks(path: Path, m: BoxMasks) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    npz = path.with_suffix(".npz")
    np.savez_compressed(npz, labels=m.labels, boxes=m.boxes,
                        **{f"m{i}": np.packbits(x, axis=None) for i, x in enumerate(m.masks)})
    write_json(path, {"case": m.case, "is_3d": m.is_3d, "seconds": m.seconds,
                      "shapes": [list(x.shape) for x in m.masks]})


def _read_masks(path: Path) -> BoxMasks:
    meta = json.loads(path.read_text())
    with np.load(path.with_suffix(".npz")) as d:
        masks = [np.unpackbits(d[f"m{i}"], count=int(np.prod(s))).astype(bool).reshape(s)
                 for i, s in enumerate(meta["shapes"])]
        return BoxMasks(meta["case"], meta["is_3d"], d["boxes"], masks, d["labels"], meta["seconds"])


@dataclass
class Judgement:
    """A variant against FP32: agreement on the held-out cases, DSC on every case with ground truth."""

    agreement_2d: float
    boxes_2d: int
    agreement_3d: float
    box_slices_3d: int
    per_case: dict[str, float]
    dsc: dict[str, Any]
    seconds: dict[str, float]  # pipeline seconds of the held-out cases, this variant and FP32
    holds: bool
    misses: list[str]


def _dsc(masks: dict[str, BoxMasks], gts: Path) -> dict[str, Any]:
    """DSC (%) per case, per modality and overall (mean of the modality means, as ``evaluate``)."""
    from mcp_medsam.evaluation.evaluate import case_modality
    from mcp_medsam.evaluation.metrics import case_scores

    per_case, per_mod = {}, {}
    for name, m in masks.items():
        with np.load(gts / name) as d:
            gt = d["gts"]
            spacing = d["spacing"] if "spacing" in d.files else None
        dsc = case_scores(gt, m.labels, spacing, nsd_dsc_gate=False)[0] * 100
        per_case[name] = dsc
        per_mod.setdefault(case_modality(name), []).append(dsc)
    mods = {k: float(np.mean(v)) for k, v in sorted(per_mod.items())}
    return {"overall": float(np.mean(list(mods.values()))), "per_modality": mods, "per_case": per_case}


def judge(seg: Segmenter, ref: Reference, cases: CaseSet) -> Judgement:
    """The bars of :data:`BARS` for the precision ``seg`` runs, through the whole pipeline."""
    agree2, agree3, per_case = [], [], {}
    secs = {"variant": 0.0, "fp32": 0.0}
    got_all: dict[str, BoxMasks] = {}
    for path in cases.validation:
        r, g = ref(path), box_masks(seg, path)
        got_all[path.name] = g
        d = box_agreement(r, g)
        (agree3 if r.is_3d else agree2).append(d)
        per_case[path.name] = round(float(d.mean()), 4)
        secs["variant"] += g.seconds
        secs["fp32"] += r.seconds
        log.info(f"  {seg.precision} {path.name}: agreement {d.mean():.4f} over {len(d)} "
                 f"{'box-slices' if r.is_3d else 'boxes'} ({g.seconds:.1f} s, fp32 {r.seconds:.1f} s)")
    a2 = np.concatenate(agree2) if agree2 else np.ones(0)
    a3 = np.concatenate(agree3) if agree3 else np.ones(0)
    misses = []
    if len(a2) and a2.mean() < BARS["2d_box_dice"]:
        misses.append(f"2D box agreement {a2.mean():.4f} < {BARS['2d_box_dice']}")
    if len(a3) and a3.mean() < BARS["3d_box_slice_dice"]:
        misses.append(f"3D box-slice agreement {a3.mean():.4f} < {BARS['3d_box_slice_dice']}")
    dsc: dict[str, Any] = {}
    if not misses and cases.gts is not None:
        for path in cases.all:
            if path.name not in got_all:
                got_all[path.name] = box_masks(seg, path)
        ours = _dsc(got_all, cases.gts)
        theirs = _dsc({p.name: ref(p) for p in cases.all}, cases.gts)
        delta = {k: round(ours["per_modality"][k] - v, 3) for k, v in theirs["per_modality"].items()}
        dsc = {"fp32": round(theirs["overall"], 3), "variant": round(ours["overall"], 3),
               "delta_points": round(ours["overall"] - theirs["overall"], 3), "delta_per_modality": delta,
               "fp32_per_modality": {k: round(v, 3) for k, v in theirs["per_modality"].items()},
               "cases": len(cases.all)}
        if abs(dsc["delta_points"]) > BARS["dsc_points"]:
            misses.append(f"sample-set DSC {dsc['variant']:.2f} vs FP32 {dsc['fp32']:.2f} "
                          f"({dsc['delta_points']:+.2f} points, bar {BARS['dsc_points']})")
    elif cases.gts is None:
        misses.append("no ground truth (gts) to check the DSC bar")
    return Judgement(round(float(a2.mean()), 5) if len(a2) else float("nan"), int(len(a2)),
                     round(float(a3.mean()), 5) if len(a3) else float("nan"), int(len(a3)), per_case, dsc,
                     {k: round(v, 2) for k, v in secs.items()}, not misses, misses)


# ---------------------------------------------------------------- building and writing variants


@dataclass
class VariantConfig:
    data: Path
    gts: Path | None = None
    calibration_cases: int = 10
    precisions: tuple[str, ...] = ("bf16", "int8")
    study_slices: int = 4
    chain_slices: int = 7  # slices of each 3D calibration case's propagation chain in the study
    max_candidates: int = 6
    threads: int | None = None
    work: Path | None = None  # keeps FP32 reference masks between runs
    study: Path | None = None  # a study JSON of an earlier run: skip the sensitivity study
    write: bool = True
    keep_unvalidated: bool = False  # no mix holds the bars: write the closest one anyway (validated false)
    json_path: Path | None = None  # the report, rewritten after the study and after every mix tried
    # A mix chosen beforehand (graph -> groups kept FP32, "*" = the whole graph): no study, only this
    # mix is judged (e.g. the one an earlier study found: ``MIXES``).
    mix: dict[str, list[str]] | None = None


@dataclass
class Candidate:
    precision: str
    f32_groups: dict[str, list[str]]
    judgement: Judgement | None = None


@dataclass
class VariantsReport:
    cpu: str
    cases: dict[str, list[str]]
    study: list[StudyRow] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _ranking(rows: list[StudyRow], precision: str) -> list[tuple[str, str]]:
    """(graph, group) from the most to the least sensitive at ``precision`` (lowest mean Dice first)."""
    own = [r for r in rows if r.precision == precision and r.group != "all"]
    return [(r.graph, r.group) for r in sorted(own, key=lambda r: (r.key, r.mean_dice, r.min_dice))]


def _keep_counts(n: int, limit: int) -> list[int]:
    ks, k = [0, 1, 2, 3], 5
    while k < n:
        ks.append(k)
        k = int(k * 1.6) + 1
    return [x for x in ks if x <= n][:limit]


def _mixes(rows: list[StudyRow], precision: str, limit: int) -> list[dict[str, list[str]]]:
    """The mixes tried at ``precision``, fastest first: the k most sensitive groups FP32 for
    k = 0, 1, 2, 3, 5, ... (``limit`` of them), then each graph wholly FP32 with the other at
    ``precision`` but for its three most sensitive groups (the most sensitive graph first)."""
    ranking = _ranking(rows, precision)
    mixes = []
    for k in _keep_counts(len(ranking), limit):
        keep: dict[str, list[str]] = {}
        for g, group in ranking[:k]:
            keep.setdefault(g, []).append(group)
        mixes.append(keep)
    entire = {r.graph: r.key for r in rows if r.precision == precision and r.group == "all"}
    for g in sorted(entire, key=entire.get):
        # One graph wholly FP32, the other's three most sensitive groups too.
        rest = [x for gg, x in ranking if gg != g][:3]
        mix = {g: list(dict.fromkeys(x for gg, x in ranking if gg == g))}
        if rest:
            mix[next(x for x in GRAPHS if x != g)] = rest
        mixes.append(mix)
    return mixes


def _variant_files(folder: Path, precision: str, f32_groups: dict[str, list[str]], data: Data | None,
                   crop_size: int) -> tuple[dict[str, Any], list[tuple[Path, Any]]]:
    """The manifest's ``graphs`` of a variant and the (path, openvino.Model) files it needs."""
    manifest = load_manifest(folder)
    files: list[tuple[Path, Any]] = []
    graphs: dict[str, Any] = {}
    for g in GRAPHS:
        xml = manifest.graph_file(g, "openvino")
        ops = GraphOps(_read(xml), RULES[g])
        keep = set(f32_groups.get(g, []))
        if "*" in keep:
            keep = set(ops.groups)
        if precision == "bf16":
            segs = split_graph(xml, RULES[g], set(ops.groups) - keep)
            if len(segs) == 1 and segs[0].hint == "f32":
                continue  # the whole graph FP32: as the fp32 precision runs it
            if len(segs) == 1:
                graphs[g] = {"segments": [{"file": xml.name, "hint": "bf16"}]}
                continue
            entries = []
            for i, s in enumerate(segs):
                path = folder / f"{g}.bf16.{i}.xml"
                files.append((path, s.model))
                entries.append({"file": path.name, "hint": s.hint, "inputs": s.inputs, "outputs": s.outputs})
            graphs[g] = {"segments": entries}
        else:
            if keep >= set(ops.groups):
                continue
            assert data is not None
            items = encoder_items(data.calib) if g == "image_encoder" else decoder_items(data.calib, crop_size)
            model = quantize_graph(_read(xml), items, ignored=ops.ops_of(keep))
            path = folder / f"{g}.int8.xml"
            files.append((path, model))
            graphs[g] = {"segments": [{"file": path.name, "hint": "f32"}]}
    return graphs, files


def _read(xml: Path) -> Any:
    import openvino as ov

    return ov.Core().read_model(str(xml))


def _stage(folder: Path, variants: dict[str, dict[str, Any]], files: list[tuple[Path, Any]], into: Path) -> Path:
    """A copy of ``folder`` in ``into`` with the variants' new files written and the manifest's
    ``variants`` (and file records) updated. The FP32 files are copied byte for byte; the files of
    earlier variants of the same precisions are left out."""
    import openvino as ov

    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    into.chmod(0o755)
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    own = {f for g in raw["graphs"].values() for f in g["files"].values()}
    own |= {Path(f).with_suffix(".bin").name for f in own if f.endswith(".xml")}
    replaced = {name for k, v in raw.get("variants", {}).items() if k in variants for g in v["graphs"].values()
                for s in g["segments"] for name in (s["file"], Path(s["file"]).with_suffix(".bin").name)} - own
    for p in folder.iterdir():
        if p.is_file() and p.name != MANIFEST_NAME and p.name not in replaced:
            shutil.copy2(p, into / p.name)
    for path, model in files:
        ov.save_model(model, str(into / path.name), compress_to_fp16=False)
    raw["variants"] = {**{k: v for k, v in raw.get("variants", {}).items() if k not in variants}, **variants}
    raw["files"] = file_records(into)
    write_json(into / MANIFEST_NAME, raw)
    return into


def build_variants(folder: Path | None, cfg: VariantConfig) -> VariantsReport:
    """Measure, choose and (``cfg.write``) write the bf16 and INT8 variants of an exported folder.

    The folder is replaced as a whole (temp copy + rename) when a variant is written; its FP32 files
    stay byte-identical. Variants that miss a bar are not written (the report says what held them back)."""
    t_start = time.perf_counter()
    folder = Path(folder) if folder is not None else bundled_weights()
    bad = [p for p in cfg.precisions if p not in REQUIRES]
    if bad:
        raise ExportError(f"unknown variant precision {', '.join(bad)}; choose from {', '.join(REQUIRES)}")
    manifest = load_manifest(folder)
    if manifest.has_clip:
        raise ExportError("variants of a model with a CLIP image tower are not supported yet (INT8 calibration "
                          "would need CLIP features); its fp32 files run as they are")
    cpu = cpu_features()
    precisions = [p for p in cfg.precisions if p != "bf16" or cpu.has("BF16")]
    if "bf16" in cfg.precisions and "bf16" not in precisions:
        log.info("note: this CPU has no bf16 support (OpenVINO): the bf16 variant cannot be measured here")
    cases = case_set(Path(cfg.data), cfg.calibration_cases, cfg.gts)
    report = VariantsReport(cpu=cpu.summary(), cases={"calibration": [p.name for p in cases.calibration],
                                                      "validation": [p.name for p in cases.validation]})
    log.info(f"variants: calibration {len(cases.calibration)} cases, validation {len(cases.validation)}; {report.cpu}")
    enc32, dec32 = IR(_read(manifest.graph_file("image_encoder", "openvino"))), IR(_read(
        manifest.graph_file("decoder", "openvino")))
    with tempfile.TemporaryDirectory() as tmp:
        # INT8 calibrates on the prompt data and the study measures on it; a given bf16 mix needs neither.
        data = None if cfg.mix is not None and precisions == ["bf16"] else \
            _prompt_data(cases, Path(cfg.data), enc32, dec32, manifest)
        if cfg.mix is not None:
            report.study = []
        elif cfg.study is not None:
            report.study = [StudyRow(**r) for r in json.loads(Path(cfg.study).read_text())["study"]]
        else:
            assert data is not None
            report.study = sensitivity(folder, data, precisions=precisions, max_slices=cfg.study_slices,
                                       chains=chains_of(cases.calibration, cfg.chain_slices), threads=cfg.threads)
        _save(report, cfg.json_path)
        log.info("\n" + format_study(report.study))
        ref = Reference(Segmenter(Engine(manifest, threads=cfg.threads, precision="fp32")), cfg.work)
        best: dict[str, tuple[float, dict[str, Any], list[tuple[Path, Any]]]] = {}
        for precision in precisions:
            for keep in [cfg.mix] if cfg.mix is not None else _mixes(report.study, precision, cfg.max_candidates):
                cand = Candidate(precision, keep)
                report.candidates.append(cand)
                k = sum(map(len, keep.values()))
                log.info(f"variants: {precision} keeping {k} group(s) FP32: {keep or 'none'}")
                graphs, files = _variant_files(folder, precision, keep, data, manifest.crop_size)
                if not graphs:
                    log.info("variants: nothing left to run faster")
                    break
                staged = _stage(folder, {precision: {"graphs": graphs, "requires": REQUIRES[precision]}}, files,
                                Path(tmp) / f"cand-{precision}-{k}")
                seg = Segmenter(Engine(load_manifest(staged), threads=cfg.threads, precision=precision))
                cand.judgement = judge(seg, ref, cases)
                del seg
                shutil.rmtree(staged, ignore_errors=True)
                j = cand.judgement
                log.info(f"variants: {precision} k={k}: 2D {j.agreement_2d:.4f} ({j.boxes_2d} boxes), 3D "
                         f"{j.agreement_3d:.4f} ({j.box_slices_3d} box-slices), DSC {j.dsc.get('delta_points', '-')}"
                         f" points, {j.seconds['variant']:.0f} s vs fp32 {j.seconds['fp32']:.0f} s; "
                         + ("holds the bars" if j.holds else "misses: " + "; ".join(j.misses)))
                _save(report, cfg.json_path)
                closeness = min(j.agreement_2d - BARS["2d_box_dice"] if j.boxes_2d else 1.0,
                                j.agreement_3d - BARS["3d_box_slice_dice"] if j.box_slices_3d else 1.0)
                if j.holds or (cfg.keep_unvalidated and closeness > best.get(precision, (-9.0,))[0]):
                    best[precision] = (closeness, _record(precision, cand, graphs, report), files)
                if j.holds:
                    break
        chosen = {p: rec for p, (_, rec, _) in best.items() if rec["validated"] or cfg.keep_unvalidated}
        files_of = {p: files for p, (_, _, files) in best.items()}
        if cfg.write and chosen:
            staged = _stage(folder, chosen, [f for p in chosen for f in files_of[p]], folder.parent / (
                f".{folder.name}.variants-{int(time.time())}"))
            swap_in(staged, folder)
            report.written = sorted(chosen)
    report.seconds = time.perf_counter() - t_start
    _save(report, cfg.json_path)
    return report


def _record(precision: str, cand: Candidate, graphs: dict[str, Any], report: VariantsReport) -> dict[str, Any]:
    """The manifest's ``variants`` entry of a judged mix."""
    j = cand.judgement
    assert j is not None
    return {"graphs": graphs, "requires": REQUIRES[precision], "validated": j.holds, "misses": j.misses,
            "f32_groups": cand.f32_groups, "bars": BARS, "method": METHODS[precision],
            "agreement": {"2d_boxes": j.agreement_2d, "2d_n": j.boxes_2d, "3d_box_slices": j.agreement_3d,
                          "3d_n": j.box_slices_3d, "per_case": j.per_case,
                          "validation_cases": report.cases["validation"],
                          "calibration_cases": report.cases["calibration"] if precision == "int8" else []},
            "dsc": j.dsc, "seconds": j.seconds, "measured_on": report.cpu}


def _save(report: VariantsReport, path: Path | None) -> None:
    if path is not None:
        write_json(path, report_json(report))


def format_report(report: VariantsReport) -> str:
    """What ``mcp-medsam variants`` prints: every mix tried with its figures, and what was written."""
    lines = [f"CPU: {report.cpu}",
             f"calibration cases: {', '.join(report.cases['calibration'])}",
             f"held-out cases: {', '.join(report.cases['validation'])}",
             f"bars: 2D box Dice >= {BARS['2d_box_dice']}, 3D box-slice Dice >= {BARS['3d_box_slice_dice']} "
             f"(held-out cases), sample-set DSC within {BARS['dsc_points']} points of FP32",
             f"{'precision':<9} {'FP32 groups':<44} {'2D':>7} {'3D':>7} {'dDSC':>6} {'s':>6} {'fp32 s':>6}  result"]
    for c in report.candidates:
        j = c.judgement
        kept = ", ".join(f"{g}:{x}" for g, xs in c.f32_groups.items() for x in xs) or "none"
        if j is None:
            lines.append(f"{c.precision:<9} {kept[:44]:<44} (not run)")
            continue
        d = j.dsc.get("delta_points")
        lines.append(f"{c.precision:<9} {kept[:44]:<44} {j.agreement_2d:>7.4f} {j.agreement_3d:>7.4f} "
                     f"{'-' if d is None else f'{d:+.2f}':>6} {j.seconds['variant']:>6.1f} {j.seconds['fp32']:>6.1f}  "
                     + ("holds the bars" if j.holds else "; ".join(j.misses)))
    lines.append(f"written: {', '.join(report.written) or 'none'} ({report.seconds / 60:.1f} min)")
    return "\n".join(lines) + "\n"


def _prompt_data(cases: CaseSet, data_dir: Path, enc32: IR, dec32: IR, manifest: Any) -> Data:
    """Calibration prompts from the calibration cases, validation prompts from the held-out ones (the
    same modality spread as :func:`case_set`, so the two splits are the same cases)."""
    return build_data(data_dir, len(cases.calibration), enc32, dec32, tokens=manifest.modality_tokens,
                      image_size=manifest.image_size, crop_size=manifest.crop_size,
                      margin=manifest.propagation_margin, n_val_cases=len(cases.validation))


def report_json(report: VariantsReport) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(report)
