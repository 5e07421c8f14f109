"""``mcp-medsam``: thin typer commands, each one call to a typed function (imported lazily, so
that ``predict`` never loads torch and every command starts fast)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MCP-MedSAM: box-prompted medical segmentation on the CPU (CVPR24 NPZ cases).")

WEIGHTS_HELP = ("Exported model folder (manifest.json). Default: $MCP_MEDSAM_WEIGHTS, else the weights installed "
                "with mcp-medsam.")


def _fail(exc: Exception) -> NoReturn:
    """One line for the user, exit status 1."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


@cli.command()
def predict(
    inputs: Path = typer.Option(..., "--input", "-i", help="Folder of CVPR24 *.npz cases (read in sorted order)."),
    outputs: Path = typer.Option(..., "--output", "-o", help="Folder for the segmentations (same file names, key 'segs')."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    backend: str = typer.Option("openvino", "--backend", help="openvino or onnxruntime (needs the folder's ONNX files)."),
    overlays: Optional[Path] = typer.Option(None, "--overlays", help="Also write a PNG per case (boxes and masks; middle slice for 3D)."),
    default_modality: Optional[str] = typer.Option(None, "--default-modality", help="Modality for file names without a known one (e.g. CT). Default: such cases fail."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="Per-case CSV (case, seconds, boxes, slices, status, message). Default: OUTPUT/timing.csv."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Boxes per decoder call."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for inference. Default: all cores."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO compiled-model cache. Default: $MCP_MEDSAM_CACHE or ~/.cache/mcp-medsam/openvino."),
) -> None:
    """Segment every case of a folder. Exit status 0 when every case succeeded, 1 otherwise."""
    from .batch import predict as run
    from .errors import SegmentationError

    try:
        results = run(inputs, outputs, weights=weights, backend=backend, overlays=overlays,
                      default_modality=default_modality, timing=timing, max_batch=max_batch, threads=threads,
                      cache_dir=cache_dir)
    except SegmentationError as exc:
        _fail(exc)
    failed = [r for r in results if r.status != "ok"]
    total = sum(r.seconds for r in results)
    typer.echo(f"{len(results) - len(failed)}/{len(results)} cases segmented in {total:.1f} s", err=True)
    raise typer.Exit(1 if failed else 0)


def _read_provenance(path: Optional[Path]) -> dict:
    import json

    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: expected a JSON object", param_hint="--provenance")
    return data


@cli.command()
def export(
    out: Path = typer.Option(..., "--out", help="Folder to write (replaced as a whole when the export verifies)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="MCP-MedSAM checkpoint ({'model': state_dict} or a state_dict). Default: the LiteMedSAM warm start."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="Local Hugging Face CLIP directory (e.g. PubMedCLIP): exports its image tower. Default: no CLIP tower (zero CLIP features)."),
    text_features: Optional[Path] = typer.Option(None, "--text-features", help="(11, 512) .npy of CLIP text features in the official category order. Default: computed with --clip's text tower, else zeros."),
    precision: str = typer.Option("fp32", "--precision", help="fp32; fp16 (IR weights stored as float16, computed in fp32); int8 (NNCF post-training quantisation)."),
    keep_onnx: bool = typer.Option(True, "--keep-onnx/--no-onnx", help="Keep the ONNX files next to the OpenVINO IR (needed by --backend onnxruntime)."),
    verify_data: Optional[Path] = typer.Option(None, "--verify-data", help="Folder of real *.npz cases used to verify the export (and to calibrate int8). Default: synthetic images only."),
    calibration_cases: int = typer.Option(12, "--calibration-cases", min=1, help="int8 only: cases of --verify-data used for calibration."),
    int8_target_dice: float = typer.Option(0.985, "--int8-target-dice", min=0.0, max=1.0, help="int8 only: least mean per-box mask Dice vs FP32 on held-out prompts; below it the encoder stays FP32, then the export fails."),
    description: Optional[str] = typer.Option(None, "--description", help="manifest.json description. Default: derived from the checkpoint."),
    provenance: Optional[Path] = typer.Option(None, "--provenance", help="JSON file (an object) stored as manifest.json 'provenance': how the weights were made. Default: none."),
) -> None:
    """Export a checkpoint to ONNX + OpenVINO IR with manifest.json, and verify it against PyTorch."""
    from mcp_medsam_torch.exporter import ExportConfig, ExportError, export_model

    try:
        export_model(ExportConfig(out=out, checkpoint=checkpoint, clip=clip, text_features=text_features,
                                  precision=precision, keep_onnx=keep_onnx, verify_data=verify_data,
                                  calibration_cases=calibration_cases, int8_target_dice=int8_target_dice,
                                  description=description, provenance=_read_provenance(provenance)))
    except (ExportError, RuntimeError) as exc:
        _fail(exc)


@cli.command()
def evaluate(
    segs: Path = typer.Option(..., "--segs", help="Folder of predicted *.npz (key 'segs'), named like the ground truth."),
    gts: Path = typer.Option(..., "--gts", help="Folder of ground-truth *.npz (key 'gts'; 3D files also carry 'spacing' (z, y, x) in mm)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the per-case scores (case, modality, dsc, nsd, status) to this CSV."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write metrics.png, timing.png (with --timing) and report.html into this folder."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="Timing CSV written by predict (e.g. OUTPUT/timing.csv): seconds per case by modality."),
    tolerance: float = typer.Option(2.0, "--tolerance", min=0.0, help="NSD tolerance in mm (challenge: 2)."),
    nsd_dsc_gate: bool = typer.Option(True, "--nsd-dsc-gate/--no-nsd-dsc-gate", help="Count NSD as 0 where the case DSC <= 0.2 (challenge rule)."),
) -> None:
    """Score segmentations with the challenge's DSC and NSD, per case, per modality and overall.

    Overall = mean of the modality means (as the paper reports). Exit status 1 when a prediction
    is missing or broken."""
    try:
        from .evaluation.evaluate import EvaluationError, evaluate_folder, format_table
    except ImportError as exc:  # scipy is the optional "eval" extra
        _fail(RuntimeError(f"evaluate needs {exc.name}: pip install 'mcp-medsam[eval]'"))
    try:
        result = evaluate_folder(segs, gts, csv_path=csv_path, report_dir=report, timing_csv=timing,
                                 tolerance=tolerance, nsd_dsc_gate=nsd_dsc_gate)
    except EvaluationError as exc:
        _fail(exc)
    typer.echo(format_table(result), nl=False)
    raise typer.Exit(1 if any(c.status != "ok" for c in result.cases) else 0)


@cli.command()
def bench(
    inputs: Path = typer.Option(..., "--input", "-i", help="Folder of CVPR24 *.npz cases."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    cold: bool = typer.Option(True, "--cold/--no-cold", help="Also time one process per case (as the challenge does), with its peak RSS."),
    with_torch: bool = typer.Option(True, "--torch/--no-torch", help="Also time the PyTorch model on the same cases (needs the export extra)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Boxes per decoder call."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads. Default: all cores."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements as JSON."),
) -> None:
    """Seconds per case, warm and cold, against the CPU's arithmetic floor (a benchmark, not a test).

    Prints per case: FLOPs of the graph calls made, floor seconds (FLOPs / measured fp32 matmul
    throughput), warm and cold seconds and their floor ratios, the peak RSS of a cold run, and the
    PyTorch model's seconds side by side."""
    from .bench import format_report, run_bench
    from .errors import SegmentationError

    try:
        report = run_bench(inputs, weights=weights, cold=cold, torch_engine=_torch_engine() if with_torch else None,
                           threads=threads, max_batch=max_batch, json_path=json_path)
    except SegmentationError as exc:
        _fail(exc)
    typer.echo(format_report(report), nl=False)


def _torch_engine():
    """The PyTorch column of ``bench``, plugged in from the PyTorch side (None, said why, without it)."""
    try:
        from mcp_medsam_torch.torch_engine import TorchEngine
    except ImportError as exc:
        typer.echo(f"note: no PyTorch column ({exc}); install the export extra", err=True)
        return None
    return TorchEngine


@cli.command()
def warmup(
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO compiled-model cache to fill. Default: $MCP_MEDSAM_CACHE or ~/.cache/mcp-medsam/openvino."),
) -> None:
    """Compile the graphs once into the cache, so that later runs load instead of compiling."""
    from .engine import default_cache_dir
    from .errors import SegmentationError
    from .segmenter import Segmenter

    try:
        Segmenter.load(weights, cache_dir=cache_dir)
    except SegmentationError as exc:
        _fail(exc)
    typer.echo(f"compiled-model cache ready in {cache_dir or default_cache_dir()}")


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@cli.command(context_settings=_PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train MCP-MedSAM with the paper's recipe (options: mcp-medsam train --help; export extra).

    Multi-GPU or multi-node: torchrun --nproc_per_node N -m mcp_medsam_torch.train train ..."""
    from mcp_medsam_torch.train.__main__ import main as train_main

    raise typer.Exit(train_main(["train", *ctx.args], prog="mcp-medsam"))


@cli.command(context_settings=_PASSTHROUGH, add_help_option=False)
def distill(ctx: typer.Context) -> None:
    """Distil the warm start from LiteMedSAM, then fine-tune: the default model's recipe (see --help)."""
    from mcp_medsam_torch.train.__main__ import main as train_main

    raise typer.Exit(train_main(["distill", *ctx.args], prog="mcp-medsam"))


def main() -> None:
    try:
        cli(prog_name="mcp-medsam")
    except SystemExit as exc:
        if sys.argv[1:2] != ["predict"]:
            raise
        # Every output is written, closed and renamed by now; skipping interpreter teardown (OpenVINO's
        # plugin and thread pools) saves ~0.1 s per process, which challenge timing (a process per case) counts.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
