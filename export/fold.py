"""Constant folding of what does not depend on a graph's inputs, on the OpenVINO IR (no PyTorch).

Why: the bundled default model's crop CNN (42.5 of the per-box graph's 76.2 GFLOP) outputs a constant.
Its last conv's weights are exactly zero (the LiteMedSAM warm start passes the no-mask embedding
through that conv's bias, and distillation kept the crop CNN frozen), so every box paid 56 % of its
arithmetic for one constant. A model whose crop CNN is live (the authors' checkpoint, any model
trained with it unfrozen) keeps it: the fold only happens when it is proved.

The proof, op by op in topological order: an op's output depends on the graph's inputs when one of
its non-constant inputs does, except a Convolution or MatMul whose weight input is a constant of
exact zeros: its output is zero for every finite input. The outputs that do not depend on the
inputs but are read by ops that do (the frontier) are computed once and become constants (their
dimensions of identical values kept at 1: the readers are broadcasting element-wise ops, checked);
graph inputs that nothing reads any more are dropped. Every graph output keeps its shape (checked).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Ops whose output is zero when their weight (input 1) is a constant of zeros and the data is finite.
ZEROING = {"Convolution", "GroupConvolution", "MatMul"}
# Element-wise ops with numpy broadcasting: a folded constant of batch 1 broadcasts over the boxes.
BROADCASTING = {"Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum"}


@dataclass
class FoldResult:
    """What a fold did: graph inputs dropped, the ops replaced by constants (friendly names, with the
    constant's shape), the per-item GFLOPs of the convolutions and matmuls that no longer run, and why."""

    removed_inputs: list[str] = field(default_factory=list)
    constants: dict[str, list[int]] = field(default_factory=dict)
    removed_gflops: float = 0.0
    reason: str = ""
    zero_weights: list[str] = field(default_factory=list)  # the ops whose zero weights made the proof

    @property
    def folded(self) -> bool:
        return bool(self.constants)


def _source(value: Any) -> Any:
    """The node behind an input value, through Convert ops (float16-stored weights decompress by a Convert)."""
    node = value.get_node()
    while node.get_type_name() == "Convert" and node.get_input_size() == 1:
        node = node.input_value(0).get_node()
    return node


def _zero_constant(value: Any) -> bool:
    node = _source(value)
    return node.get_type_name() == "Constant" and not np.any(node.get_data())


def _upstream_of_results(model: Any) -> set[str]:
    """Internal names of the ops the graph's outputs are computed from (the replaced ops still
    reference their inputs, so a graph input with readers may be dead)."""
    seen: set[str] = set()
    todo = list(model.get_results())
    while todo:
        node = todo.pop()
        if node.get_name() in seen:
            continue
        seen.add(node.get_name())
        todo.extend(v.get_node() for v in node.input_values())
    return seen


def _per_item_gflops(op: Any) -> float:
    """2 x multiply-adds of one batch item of a Convolution / GroupConvolution / MatMul (static dims
    but the first), as torch's FLOP counter counts them; 0 for other ops."""
    kind = op.get_type_name()
    if kind not in ZEROING:
        return 0.0
    out = op.get_output_partial_shape(0)
    w = op.get_input_partial_shape(1)
    if out.rank.is_dynamic or not w.is_static or any(d.is_dynamic for d in list(out)[1:]):
        return 0.0
    out_dims = [d.get_length() for d in list(out)[1:]]
    wd = [d.get_length() for d in w]
    if kind == "Convolution":  # weight (Cout, Cin, k...), output (N, Cout, spatial...)
        macs = int(np.prod(out_dims)) * int(np.prod(wd[1:]))
    elif kind == "GroupConvolution":  # weight (G, Cout/G, Cin/G, k...)
        macs = int(np.prod(out_dims)) * int(np.prod(wd[2:]))
    else:  # MatMul: output (..., M, N), inner dimension from the weight's shape
        transpose_b = bool(op.get_attributes().get("transpose_b", False))
        inner = wd[-1] if transpose_b else wd[-2] if len(wd) > 1 else wd[0]
        macs = int(np.prod(out_dims)) * inner
    return 2.0 * macs / 1e9


def fold_constants(model: Any, *, reason: str = "input-independent") -> FoldResult:
    """Fold the input-independent outputs of an ``openvino.Model`` in place (see the module doc).

    Returns what was folded (``folded`` false and ``reason`` saying why when nothing was: nothing to
    fold, or a frontier read by an op that does not broadcast)."""
    from mcp_medsam.engine import compile_openvino

    import openvino as ov

    params = list(model.get_parameters())
    ops = list(model.get_ordered_ops())
    # Keyed by the ops' unique internal names (Python wrappers of one node are not the same object).
    dependent: set[str] = set()  # ops whose output depends on a graph input
    from_input: set[str] = set()  # ops downstream of a graph input at all
    zeroed: list[str] = []
    for op in ops:
        kind = op.get_type_name()
        ins = [v.get_node().get_name() for v in op.input_values()]
        if kind == "Parameter":
            from_input.add(op.get_name())
            dependent.add(op.get_name())
            continue
        if any(n in from_input for n in ins):
            from_input.add(op.get_name())
        if kind in ZEROING and op.get_input_size() > 1 and _zero_constant(op.input_value(1)):
            if op.get_name() in from_input:
                zeroed.append(op.get_friendly_name())
            continue  # zero weights: the output is zero whatever the data input is
        if any(n in dependent for n in ins):
            dependent.add(op.get_name())
    frontier = []
    for op in ops:
        name = op.get_name()
        if name in dependent or name not in from_input or op.get_type_name() in ("Result", "Parameter"):
            continue
        readers = [t.get_node().get_name() for t in op.output(0).get_target_inputs()]
        if any(r in dependent for r in readers):
            frontier.append(op)
    if not frontier:
        return FoldResult(reason="nothing input-independent is computed from the graph's inputs")
    for op in frontier:
        if op.get_output_size() != 1:
            return FoldResult(reason=f"{op.get_friendly_name()} has several outputs")
        for t in op.output(0).get_target_inputs():
            reader = t.get_node()
            if reader.get_type_name() not in BROADCASTING or \
                    str(reader.get_attributes().get("auto_broadcast", "numpy")).lower() != "numpy":
                return FoldResult(reason=f"{op.get_friendly_name()} is read by {reader.get_type_name()} "
                                         f"{reader.get_friendly_name()}, which does not broadcast a batch of one")
    before_outputs = [r.get_output_partial_shape(0) for r in model.get_results()]
    before_ops = {op.get_name(): op for op in ops}

    # Compute the frontier once (twice, on different inputs: the proof's result is checked too).
    sub = ov.Model([op.output(0) for op in frontier], params, "fold")
    compiled = compile_openvino(sub, precision_hint="f32")
    rng = np.random.default_rng(0)
    runs = []
    for fill in ("zeros", "random"):
        feed = {}
        for p in params:
            shape = [1 if d.is_dynamic else d.get_length() for d in p.get_output_partial_shape(0)]
            dtype = p.get_output_element_type(0).to_dtype()
            feed[p.get_friendly_name()] = (np.zeros(shape, dtype) if fill == "zeros"
                                           else rng.random(shape).astype(dtype))
        request = compiled.create_infer_request()
        request.infer(feed)
        runs.append([request.get_output_tensor(i).data.copy() for i in range(len(frontier))])
    result = FoldResult(reason=reason, zero_weights=zeroed)
    for i, op in enumerate(frontier):
        a, b = runs[0][i], runs[1][i]
        if not np.array_equal(a, b):
            return FoldResult(reason=f"{op.get_friendly_name()} differs between inputs (proof and graph disagree)")
        value = a
        for axis in range(1, value.ndim):
            if value.shape[axis] > 1 and np.all(value == value.take([0], axis=axis)):
                value = value.take([0], axis=axis)
        const = ov.opset13.constant(np.ascontiguousarray(value))
        const.set_friendly_name(f"{op.get_friendly_name()}/folded")
        op.output(0).replace(const.output(0))
        result.constants[op.get_friendly_name()] = list(value.shape)
    live = _upstream_of_results(model)
    for p in params:
        if p.get_name() not in live:
            model.remove_parameter(p)
            result.removed_inputs.append(p.get_friendly_name())
    model.validate_nodes_and_infer_types()
    after = [r.get_output_partial_shape(0) for r in model.get_results()]
    if [str(s) for s in after] != [str(s) for s in before_outputs]:
        raise RuntimeError(f"folding changed the graph's output shapes ({before_outputs} -> {after})")
    remaining = {op.get_name() for op in model.get_ordered_ops()}
    result.removed_gflops = sum(_per_item_gflops(op) for name, op in before_ops.items() if name not in remaining)
    return result


def fold_ir(xml: Path, *, compress_to_fp16: bool, reason: str = "input-independent") -> FoldResult:
    """Fold an IR file in place (``xml`` and its ``.bin``, each replaced by a rename). float16-stored
    weights stay float16 (``compress_to_fp16``); nothing is written when nothing folds."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    result = fold_constants(model, reason=reason)
    if result.folded:
        tmp = xml.with_name(f".{xml.stem}.fold-{os.getpid()}.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=compress_to_fp16)
        del model
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    return result


def describe(result: FoldResult) -> dict[str, Any]:
    """The manifest's ``graphs.<graph>.folded`` record of a fold: what became a constant and why."""
    record: dict[str, Any] = {}
    if any(n.startswith("/crop_nets/") for n in result.constants):
        record["crop_net"] = "constant dense embedding, last conv weight zero"
    record.update({"why": result.reason, "zero_weights": result.zero_weights, "constants": result.constants,
                   "removed_inputs": result.removed_inputs, "gflops_removed": round(result.removed_gflops, 3)})
    return record


def record_fold(graph: dict[str, Any], result: FoldResult) -> None:
    """Update a graph's manifest entry after a fold: inputs, per-item GFLOPs (those the graph really
    has now; the unfolded figure kept as ``gflops_unfolded``), the ``folded`` record."""
    graph["inputs"] = {k: v for k, v in graph["inputs"].items() if k not in result.removed_inputs}
    graph["gflops_unfolded"] = graph["gflops"]
    graph["gflops"] = round(graph["gflops"] - result.removed_gflops, 3)
    graph["folded"] = describe(result)


def fold_folder(folder: Path, *, verify_data: Path | None = None, cases: int = 3) -> FoldResult:
    """Fold an exported folder's per-box graph (its IR) in place, for folders whose checkpoint is not
    at hand (an export folds as it writes). The folded graph is judged against the unfolded one
    through the runtime on the export's verification inputs (real cases of ``verify_data``) and held to
    the export's decoder bar; the folder is replaced as a whole only when it holds. Variants built on
    the unfolded graph are dropped (rebuild them with ``mcp-medsam variants``)."""
    import json
    import shutil
    import tempfile

    from mcp_medsam.io.atomic import write_json
    from mcp_medsam.manifest import MANIFEST_NAME, file_records, load_manifest, sha256_file

    from .config import ExportError, swap_in

    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.raw["graphs"]["decoder"].get("folded"):
        return FoldResult(reason="already folded")
    if any("onnx" in g.files for g in manifest.graphs.values()):
        raise ExportError(f"{folder} keeps ONNX files: the fold rewrites the OpenVINO IR only (export with --no-onnx)")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.fold-"))
    tmp.chmod(0o755)
    try:
        for p in folder.iterdir():
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
        raw = json.loads((tmp / MANIFEST_NAME).read_text())
        graph = raw["graphs"]["decoder"]
        xml = tmp / graph["files"]["openvino"]
        before = {p.name: sha256_file(p) for p in (xml, xml.with_suffix(".bin"))}
        result = fold_ir(xml, compress_to_fp16=manifest.precision == "fp16",
                         reason="output independent of the graph's inputs (zero weights)")
        if not result.folded:
            shutil.rmtree(tmp, ignore_errors=True)
            return result
        record_fold(graph, result)
        graph["folded"]["unfolded_sha256"] = before
        dropped = sorted(raw.pop("variants", {}))
        if dropped:
            log.info(f"note: dropped the variants built on the unfolded graph ({', '.join(dropped)}): "
                     f"rebuild them with 'mcp-medsam variants'")
        raw["files"] = file_records(tmp)
        write_json(tmp / MANIFEST_NAME, raw)
        graph["folded"]["verification"] = _judge(folder, tmp, verify_data, cases)
        write_json(tmp / MANIFEST_NAME, raw)
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _judge(unfolded: Path, folded: Path, verify_data: Path | None, cases: int) -> dict[str, Any]:
    """The folded decoder against the unfolded one, through the runtime, on the export's verification
    feeds; raises ExportError when it misses the export's decoder bar."""
    from mcp_medsam.engine import Engine
    from mcp_medsam.manifest import load_manifest

    from .config import ExportError
    from .verify import BARS, feeds, figures, graph_precision

    ref_manifest = load_manifest(unfolded)
    ref_engine = Engine(ref_manifest, precision="fp32")
    got_engine = Engine(load_manifest(folded), precision="fp32")

    def ref(graph: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return ref_engine.encode(feed["image"]) if graph == "image_encoder" else ref_engine.decode(feed)[0]

    bar = BARS[("decoder", graph_precision(ref_manifest, "decoder", "openvino"))]
    worst: dict[str, float] = {}
    for label, feed in feeds(ref_manifest, ref, verify_data=verify_data, cases=cases)["decoder"]:
        f = figures(ref("decoder", feed), got_engine.decode(feed)[0])
        log.info(f"fold: decoder {label[:44]:<44} {f['max_abs_diff']:>10.2e} {f['sign_agreement'] * 100:>8.3f}%")
        worst = {k: (max if k != "sign_agreement" else min)(worst.get(k, v), v) for k, v in f.items()}
    if not bar.met(worst[bar.metric]):
        raise ExportError(f"the folded decoder misses the bar {bar} against the unfolded one: {worst}")
    return {"against": "the unfolded IR (OpenVINO, fp32)", **worst, "bar": str(bar)}
