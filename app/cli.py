"""``mcp-medsam``: thin typer commands, each one call to a typed function (imported lazily, so
that ``predict`` never loads torch and every command starts fast)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, NoReturn, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors

# The PyTorch side's packages (the export extra); a command that needs them says how to install them.
_EXPORT_EXTRA = ("torch", "onnx", "transformers", "safetensors", "nncf")
INSTALL_TORCH = ("pip install torch --index-url https://download.pytorch.org/whl/cpu && "
                 "pip install 'mcp-medsam[export]'")
# Help shows a word for the value an option takes, not a Python type.
_METAVARS = {"path": "PATH", "text": "TEXT", "integer": "N", "integer range": "N", "float": "NUMBER",
             "float range": "NUMBER"}


def _metavar(param) -> str:
    desc = getattr(param, "type_descriptor", None)  # typer's record of the annotation
    if desc is None:  # pragma: no cover - older typer: click's type name
        kind = param.type.name
    elif desc.is_path:
        kind = "path"
    else:
        annotation = desc.annotation
        while getattr(annotation, "__args__", None) and getattr(annotation, "__origin__", None) is list:
            annotation = annotation.__args__[0]
        kind = {int: "integer", float: "float", str: "text"}.get(annotation, getattr(annotation, "__name__", "value"))
    return _METAVARS.get(kind, str(kind).upper())


def _plain_metavars(command) -> None:
    """Value placeholders as words (PATH, N, TEXT) for every option of every command, and none after an
    argument's name: typer would show Python types (``<list[Path]>``). Each command's first paragraph is
    its line in the command list."""
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") == "argument":
            param.display_type_rich = lambda ctx: None
            param.metavar = param.metavar or param.name.upper()
        elif param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = _metavar(param)
    if command.help and not command.short_help:  # the first sentence whole, wrapped, never cut with "..."
        command.short_help = command.help.strip().split("\n\n")[0]
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


class _Commands(TyperGroup):
    """The command group, with the project's error style: a bad command line is one ``error:`` line
    (exit status 2), Ctrl-C one ``error:`` line (exit status 130), never a box or a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _plain_metavars(self)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_errors.NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except _click_errors.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            typer.echo(f"error: {_usage_message(exc)}{where}", err=True)
            code = exc.exit_code
        except _click_errors.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        code = 0 if code is None else code
        if not standalone_mode:
            return code
        sys.exit(code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("error: interrupted (Ctrl-C)", err=True)
            raise typer.Exit(130) from None


def _usage_message(exc) -> str:
    """click's message, with a hint where a flag was given a value (``--skip-existing true``)."""
    text = exc.format_message()
    m = re.search(r"unexpected extra argument\S* \((\S+?)\)", text, flags=re.IGNORECASE)
    if m and m.group(1).lower() in ("true", "false", "yes", "no", "1", "0"):
        text += "; an on/off option takes no value: give --NAME for on, --no-NAME for off"
    return text


cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Commands,
                  rich_markup_mode=None,
                  help="MCP-MedSAM: box-prompted medical segmentation on the CPU (CVPR24 NPZ cases).")


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mcp-medsam {__version__}")
        raise typer.Exit(0)


@cli.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="Print the version and exit.")) -> None:
    """MCP-MedSAM: box-prompted medical segmentation on the CPU (CVPR24 NPZ cases)."""


def _torch_side(module: str, command: str, ctx: Optional[typer.Context] = None):
    """A module of the PyTorch side (``mcp_medsam_torch``), imported only by the commands that need it.
    Without the export extra: one ``error:`` line naming it (exit status 1); with ``ctx`` and --help
    among its arguments, the command's own help and that line as a note (exit status 0)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in _EXPORT_EXTRA:
            raise
    hint = f"mcp-medsam {command} needs the PyTorch side ({missing} is not installed): {INSTALL_TORCH}"
    if ctx is not None and any(a in ("--help", "-h") for a in ctx.args):
        typer.echo(ctx.get_help())
        typer.echo(f"\nnote: its options are listed here once the PyTorch side is installed; {hint}")
        raise typer.Exit(0)
    _fail(RuntimeError(hint))

WEIGHTS_HELP = ("Exported model folder (manifest.json). Default: $MCP_MEDSAM_WEIGHTS, else the weights installed "
                "with mcp-medsam.")
PRECISION_HELP = ("auto: the fastest variant of the model folder that held its agreement bars against FP32 and that this "
                  "CPU supports (bf16 where OpenVINO reports bf16 support, INT8 with VNNI), else fp32; or fp32, bf16, "
                  "int8. Default: $MCP_MEDSAM_PRECISION, else auto.")


def _precision(value):
    """--precision values are checked before anything runs (a bad one is a usage error, exit 2)."""
    allowed = ("auto", "fp32", "bf16", "int8")
    for v in ([value] if isinstance(value, str) else value or []):
        if v not in allowed:
            raise typer.BadParameter(f"{v!r} is not one of {', '.join(allowed)}")
    return value


def _fail(exc: Exception) -> NoReturn:
    """One line for the user, exit status 1."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


@contextmanager
def _user_errors() -> Iterator[None]:
    """The runners' errors as the command line reports them: a bad command line is one line and exit
    status 2, any other problem of the user's (input, folders, model) one line and exit status 1."""
    from .errors import SegmentationError, UsageError

    try:
        yield
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except SegmentationError as exc:
        _fail(exc)


@cli.command()
def predict(
    inputs: Path = typer.Option(..., "--input", "-i", help="Folder of *.npz cases, CVPR24 or CVPR25 layout (read in sorted order)."),
    outputs: Path = typer.Option(..., "--output", "-o", help="Folder for the segmentations (same file names, key 'segs'); must not be the input folder, inside it or around it."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    backend: str = typer.Option("openvino", "--backend", help="openvino or onnxruntime (needs the folder's ONNX files)."),
    overlays: Optional[Path] = typer.Option(None, "--overlays", help="Also write a PNG per case (boxes and masks; middle slice for 3D)."),
    default_modality: Optional[str] = typer.Option(None, "--default-modality", help="Modality for file names without a known one (e.g. CT). Default: such cases fail."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="Per-case CSV (case, seconds, boxes, slices, status, message). Default: OUTPUT/timing.csv."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Boxes per decoder call."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for inference. Default: all cores."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO compiled-model cache. Default: $MCP_MEDSAM_CACHE or ~/.cache/mcp-medsam/openvino."),
    max_image_mb: float = typer.Option(2048.0, "--max-image-mb", help="Largest decompressed 'imgs' a case may have, in MiB (checked from its header; larger cases fail)."),
    num_parts: int = typer.Option(1, "--num-parts", min=1, help="Split the sorted case list into N parts (job arrays: one task per part); 1: the whole folder."),
    part_id: Optional[str] = typer.Option(None, "--part-id", help="The part to run, 0..N-1: every N-th case from the I-th; rows to timing.part-I-of-N.csv, merged into the timing CSV when the last part finishes. 'auto': $SLURM_ARRAY_TASK_ID (less $SLURM_ARRAY_TASK_MIN), else $JOB_COMPLETION_INDEX. Default: none (needs --num-parts 1)."),
    skip_existing: bool = typer.Option(False, "--skip-existing/--no-skip-existing", help="Resume: keep an output that reads back whole with the case's shape (row status 'skipped'); redo a truncated, unreadable or wrong one."),
    dask: Optional[str] = typer.Option(None, "--dask", help="Run the cases as Dask tasks: local:N (N single-threaded worker processes here) or a scheduler address tcp://HOST:8786 (or a scheduler file .json); folders on a file system the workers share. Needs the dask extra. Default: this process."),
    precision: Optional[str] = typer.Option(None, "--precision", callback=_precision, help=PRECISION_HELP),
) -> None:
    """Segment every case of a folder of NPZ cases.

    Exit status 0 when every case succeeded or was kept, 1 otherwise (also for a problem with the folders
    or the model, before any case runs), 2 for a bad command line; 143/130 when ended by SIGTERM/SIGINT."""
    from .batch import predict as run
    from .batch import summary
    from .engine import set_default_precision
    from .io.atomic import Interrupted

    set_default_precision(precision)  # read by every model load of the run, Dask workers started here included
    t0 = time.perf_counter()
    try:
        with _user_errors():
            results = run(inputs, outputs, weights=weights, backend=backend, overlays=overlays,
                          default_modality=default_modality, timing=timing, max_batch=max_batch, threads=threads,
                          cache_dir=cache_dir, max_image_mb=max_image_mb, num_parts=num_parts, part_id=part_id,
                          skip_existing=skip_existing, dask=dask)
    except Interrupted as exc:
        typer.echo(f"error: {exc}: {exc.finished} case(s) finished and recorded; the case in flight was "
                   f"abandoned", err=True)
        raise typer.Exit(exc.exit_status)
    typer.echo(summary(results, time.perf_counter() - t0), err=True)
    raise typer.Exit(1 if any(r.status not in ("ok", "skipped") for r in results) else 0)


timing_cli = typer.Typer(no_args_is_help=True, help="The per-case timing CSV of predict runs.")
cli.add_typer(timing_cli, name="timing")


@timing_cli.command("merge")
def timing_merge(
    outputs: Optional[Path] = typer.Argument(None, metavar="OUTPUT", help="The output folder of the parts (their timing.part-I-of-N.csv files, written to OUTPUT/timing.csv)."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="The merged CSV when the parts ran with --timing FILE (their files lie beside it). Default: OUTPUT/timing.csv."),
    num_parts: Optional[int] = typer.Option(None, "--num-parts", min=1, help="Which split to merge when part files of several N lie there. Default: the only one."),
    inputs: Optional[Path] = typer.Option(None, "--input", "-i", help="The input folder: also check that every case has a row (exit 1 when some have none). Default: no check."),
) -> None:
    """Merge the parts' timing files into the one timing.csv.

    The parts' timing.part-I-of-N.csv files are merged (a part's run does it by itself when it is the
    last to finish). Exit status 1 when a part has written no file yet, or with --input when
    cases have no row."""
    from .batch import merge_timing_files

    with _user_errors():
        report = merge_timing_files(outputs, timing=timing, num_parts=num_parts, inputs=inputs)
    typer.echo(f"{report.timing}: {report.rows} rows from {report.num_parts} parts")
    if report.missing:
        shown = ", ".join(report.missing[:5]) + (", ..." if len(report.missing) > 5 else "")
        _fail(RuntimeError(f"{len(report.missing)} case(s) of {inputs} have no row yet ({shown}): a part is still "
                           f"running or was stopped; run it again with --skip-existing"))


@cli.command()
def segment(
    inputs: list[Path] = typer.Argument(..., metavar="INPUT", help="Images: .nii/.nii.gz, .nrrd, .mha, .dcm, .png/.jpg/.jpeg/.bmp/.tif/.tiff, a CVPR24 .npz case, a DICOM series folder, or a folder of image files (a batch; files named *_label/_mask/_seg/_gt left out)."),
    output: str = typer.Option(..., "--output", "-o", metavar="PATH", help="Result file (format from its extension: .nii.gz, .nii, .nrrd, .mha, .png, .tif, .bmp, .npz) for one INPUT, else a folder (an existing one, or a path ending in /): one result per input, named like it. Other extensions are refused."),
    modality: str = typer.Option(..., "--modality", "-m", help="CT, MR, PET, XRay, US, Mammography, Endoscopy, Fundus, Dermoscopy, Microscopy, OCT (and aliases; case ignored)."),
    box: Optional[list[str]] = typer.Option(None, "--box", help="A box in voxel indices, inclusive: x0,y0,x1,y1 (2D) or x0,y0,z0,x1,y1,z1 (3D); x = column, y = row, z = slice. Repeatable; labels 1..N in order."),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help='JSON file whose key "boxes" holds a list of boxes, each 4 or 6 numbers as --box takes them (or maps input file names to such lists; schema in README); labels 1..N.'),
    boxes_from: Optional[Path] = typer.Option(None, "--boxes-from", help="Label image on the same grid (several INPUTs: a folder of them, named like the inputs or with _label/_mask/_seg/_gt): one tight box per label value; the output keeps those values. A soft 0..255 mask is thresholded at half its range (with a note); pictures are refused."),
    min_size: int = typer.Option(10, "--min-size", help="--boxes-from: labels of fewer pixels/voxels get no box (the challenge's rule)."),
    mask_threshold: Optional[float] = typer.Option(None, "--mask-threshold", help="--boxes-from: binarise label images holding values above T (values above T are label 1; e.g. 127 for a soft 0..255 mask); label images with no value above T are kept as they are. Default: labels as they are; JPEG: 127; a soft mask: half its range."),
    window: Optional[str] = typer.Option(None, "--window", help="LEVEL,WIDTH: clip native values to LEVEL +- WIDTH/2, then 0..255. Default: CT volumes 40,400 (HU); other volumes 0.5..99.5 percentiles of voxels > 0; 8-bit 2D as is; 16-bit/float 2D and grey microscopy: 0.5..99.5 percentiles."),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID to read from a DICOM folder holding several series. Default: the folder's only series."),
    out_format: Optional[str] = typer.Option(None, "--format", help="Folder OUTPUT: write every result as this type (nii.gz, nii, nrrd, mha, png, tif, bmp, npz). Default: the input's own (.nii.gz for DICOM, .png for JPEG)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    backend: str = typer.Option("openvino", "--backend", help="openvino or onnxruntime (needs the folder's ONNX files)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Boxes per decoder call."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for inference. Default: all cores."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO compiled-model cache. Default: $MCP_MEDSAM_CACHE or ~/.cache/mcp-medsam/openvino."),
    num_parts: int = typer.Option(1, "--num-parts", min=1, help="Split the INPUTs, sorted by path, into N parts (job arrays); 1: every INPUT."),
    part_id: Optional[str] = typer.Option(None, "--part-id", help="The part to run, 0..N-1 (every N-th INPUT from the I-th), or 'auto': $SLURM_ARRAY_TASK_ID (less $SLURM_ARRAY_TASK_MIN), else $JOB_COMPLETION_INDEX. Default: none (needs --num-parts 1)."),
    skip_existing: bool = typer.Option(False, "--skip-existing/--no-skip-existing", help="Resume: keep an output that reads back as labels on the input's grid; redo a truncated or unreadable one."),
    precision: Optional[str] = typer.Option(None, "--precision", callback=_precision, help=PRECISION_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs. Default: an existing output is refused before the model loads."),
    max_image_mb: float = typer.Option(2048.0, "--max-image-mb", help="Largest decoded input or label image in MiB (native values), checked from the file's header before decoding; larger inputs fail."),
) -> None:
    """Segment medical images in their own formats.

    Results in the input's format and geometry.
    Intensities as the CVPR24 challenge converted them (see --window). Exit status 0 when every
    input succeeded, 1 when one failed (one 'error:' line each; the others still run), 2 for a
    bad command line. NIfTI, NRRD, MetaImage and DICOM need the io extra (SimpleITK)."""
    from .batch import summary
    from .segment import segment as run

    t0 = time.perf_counter()
    with _user_errors():
        results = run(inputs, output, modality=modality, box=box or (), boxes=boxes, boxes_from=boxes_from,
                      series=series, window=window, min_size=min_size, mask_threshold=mask_threshold,
                      out_format=out_format, weights=weights, backend=backend, threads=threads,
                      max_batch=max_batch, cache_dir=cache_dir, num_parts=num_parts, part_id=part_id,
                      skip_existing=skip_existing, precision=precision, overwrite=overwrite,
                      max_image_mb=max_image_mb)
    typer.echo(summary(results, time.perf_counter() - t0, "inputs"), err=True)
    raise typer.Exit(1 if any(r.status not in ("ok", "skipped") for r in results) else 0)


def _log_to_stdout(name: str) -> None:
    """Show a package's INFO log lines on stdout as plain text (the export's progress and parity table)."""
    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
    variants: Optional[list[str]] = typer.Option(None, "--variants", help="Also measure and write faster precisions (repeatable: bf16, int8) as 'mcp-medsam variants' does, on --verify-data (its first 10 cases of the modality spread calibrate, the others judge). Default: none."),
    fold: bool = typer.Option(True, "--fold/--no-fold", help="Fold what provably does not depend on the inputs (a crop CNN whose last conv is zero) into constants of the per-box graph's IR; needs --no-onnx. Default: fold."),
) -> None:
    """Export a checkpoint to OpenVINO IR and verify it.

    Writes ONNX + OpenVINO IR with manifest.json and compares the graphs against PyTorch (export extra)."""
    import shlex

    exporter = _torch_side("mcp_medsam_torch.exporter", "export")
    ExportConfig, ExportError, export_model = exporter.ExportConfig, exporter.ExportError, exporter.export_model

    _log_to_stdout("mcp_medsam_torch")
    try:
        export_model(ExportConfig(out=out, checkpoint=checkpoint, clip=clip, text_features=text_features,
                                  precision=precision, keep_onnx=keep_onnx, verify_data=verify_data,
                                  calibration_cases=calibration_cases, int8_target_dice=int8_target_dice,
                                  description=description, provenance={
                                      **_read_provenance(provenance),
                                      # The command that made the folder, so that it can be run again.
                                      "export_command": "mcp-medsam " + shlex.join(sys.argv[1:])},
                                  variants=tuple(variants or ()), fold=fold))
    except (ExportError, RuntimeError) as exc:
        _fail(exc)


@cli.command()
def fold(
    folder: Optional[Path] = typer.Argument(None, help="Exported model folder (OpenVINO IR, no ONNX files) to fold in place. Default: $MCP_MEDSAM_WEIGHTS, else the weights installed with mcp-medsam."),
    verify_data: Optional[Path] = typer.Option(None, "--verify-data", help="Folder of real *.npz cases the folded graph is judged on against the unfolded one. Default: synthetic images only."),
    verify_cases: int = typer.Option(3, "--verify-cases", min=1, help="Cases of --verify-data to judge on."),
) -> None:
    """Fold the per-box graph's input-independent part into constants (export extra).

    What 'mcp-medsam export --no-onnx' does as it writes, for a folder whose checkpoint is not at hand:
    a crop CNN whose last conv weights are zero becomes its constant output and the crops input goes.
    Judged against the unfolded graph (the export's decoder bar); variants are dropped (rebuild them)."""
    fold_side = _torch_side("mcp_medsam_torch.fold", "fold")
    from .errors import SegmentationError
    from .manifest import bundled_weights

    _log_to_stdout("mcp_medsam_torch")
    try:
        result = fold_side.fold_folder(folder or bundled_weights(), verify_data=verify_data, cases=verify_cases)
    except (SegmentationError, RuntimeError) as exc:
        _fail(exc)
    typer.echo(f"folded: {', '.join(result.constants)}; {result.removed_gflops:.1f} GFLOP per box less; inputs "
               f"dropped: {', '.join(result.removed_inputs) or 'none'}" if result.folded else f"nothing folded: {result.reason}")


@cli.command()
def variants(
    folder: Optional[Path] = typer.Argument(None, help="Exported model folder (manifest.json) to add the variants to. Default: $MCP_MEDSAM_WEIGHTS, else the weights installed with mcp-medsam."),
    data: Path = typer.Option(..., "--data", "-d", help="Folder of real *.npz cases: the first --calibration-cases of the modality spread calibrate INT8, the others are held out to judge the variants."),
    gts: Optional[Path] = typer.Option(None, "--gts", help="Ground truth of --data for the DSC bar. Default: DATA/../gts when it exists."),
    precision: list[str] = typer.Option(["bf16", "int8"], "--precision", help="Variants to build (repeatable): bf16 (measured only where OpenVINO reports bf16 support), int8."),
    calibration_cases: int = typer.Option(10, "--calibration-cases", min=1, help="Cases of --data that calibrate (never judge)."),
    study_slices: int = typer.Option(4, "--study-slices", min=1, help="Held-out slices of the sensitivity study (each group alone at each precision; given and propagation-style boxes)."),
    chain_slices: int = typer.Option(7, "--chain-slices", min=2, help="Slices of each 3D calibration case's propagation chain in the sensitivity study."),
    max_candidates: int = typer.Option(6, "--max-candidates", min=1, help="Mixes tried per precision (0, 1, 2, 3, 5, ... most sensitive groups kept FP32)."),
    study: Optional[Path] = typer.Option(None, "--study", help="Reuse the sensitivity study of an earlier --json instead of measuring it again. Default: measure."),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder that keeps the FP32 reference masks between runs. Default: none (computed each run)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads. Default: all cores."),
    write: bool = typer.Option(True, "--write/--no-write", help="Write the variants that hold the bars into the folder (new files; the FP32 files stay byte-identical)."),
    keep_unvalidated: bool = typer.Option(False, "--keep-unvalidated/--no-keep-unvalidated", help="Where no mix holds the bars, write the closest one anyway, marked unvalidated: auto never runs it, --precision bf16/int8 does."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the study, every mix tried and its figures as JSON."),
    mix: Optional[list[str]] = typer.Option(None, "--mix", help="Judge only this mix, no study (repeatable): GRAPH:GROUP kept FP32 (GRAPH:* the whole graph), or 'found' for the mix the study found (bf16: encoder FP32, per-box graph bf16 but prompt and transformer layers 0-1). Default: study, then search."),
) -> None:
    """Build bf16 / INT8 variants that keep FP32's masks.

    Measure which layer groups lose masks in bf16 / INT8, find the fastest mix that holds the agreement
    bars against FP32 (2D boxes >= 0.98, 3D box-slices >= 0.97, sample-set DSC within 0.3 points), and write
    it into the model folder's manifest, where --precision auto finds it (export extra: NNCF)."""
    variant_side = _torch_side("mcp_medsam_torch.precision", "variants")
    VariantConfig, build_variants, format_report = (variant_side.VariantConfig, variant_side.build_variants,
                                                    variant_side.format_report)

    from .errors import SegmentationError

    _log_to_stdout("mcp_medsam_torch")
    try:
        report = build_variants(folder, VariantConfig(
            data=data, gts=gts, precisions=tuple(precision), calibration_cases=calibration_cases,
            study_slices=study_slices, chain_slices=chain_slices, max_candidates=max_candidates, study=study, work=work, threads=threads,
            write=write, keep_unvalidated=keep_unvalidated, json_path=json_path,
            mix=variant_side.parse_mix(mix or [], precision)))
    except (SegmentationError, RuntimeError) as exc:
        _fail(exc)
    typer.echo(format_report(report), nl=False)


@cli.command()
def evaluate(
    segs: Path = typer.Option(..., "--segs", help="Folder of predicted *.npz (key 'segs'), named like the ground truth."),
    gts: Path = typer.Option(..., "--gts", help="Folder of ground-truth *.npz (key 'gts'; 3D files also carry 'spacing' (z, y, x) in mm)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the per-case scores (case, modality, dsc, nsd, status) to this CSV."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write metrics.png, timing.png (with --timing) and report.html into this folder."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="Timing CSV written by predict (e.g. OUTPUT/timing.csv): seconds per case by modality."),
    tolerance: float = typer.Option(2.0, "--tolerance", min=0.0, help="NSD tolerance in mm (challenge: 2)."),
    nsd_dsc_gate: bool = typer.Option(True, "--nsd-dsc-gate/--no-nsd-dsc-gate", help="Count NSD as 0 where the case DSC <= 0.2 (challenge rule)."),
    only_predicted: bool = typer.Option(False, "--only-predicted/--all-cases", help="Score only the ground-truth cases that have a prediction (a run over part of them); else each missing prediction scores 0. The summary counts them either way."),
) -> None:
    """Score segmentations with the challenge's DSC and NSD.

    Per case, per modality and overall.
    Overall = mean of the modality means (as the paper reports). Exit status 1 when a prediction
    is missing (unless --only-predicted) or broken."""
    try:
        from .evaluation.evaluate import EvaluationError, evaluate_folder, format_table
    except ImportError as exc:  # scipy is the optional "eval" extra
        _fail(RuntimeError(f"evaluate needs {exc.name}: pip install 'mcp-medsam[eval]'"))
    try:
        result = evaluate_folder(segs, gts, csv_path=csv_path, report_dir=report, timing_csv=timing,
                                 tolerance=tolerance, nsd_dsc_gate=nsd_dsc_gate, only_predicted=only_predicted)
    except EvaluationError as exc:
        _fail(exc)
    typer.echo(format_table(result), nl=False)
    raise typer.Exit(1 if any(c.status != "ok" for c in result.cases) else 0)


@cli.command("evaluate-interactive")
def evaluate_interactive(
    inputs: Path = typer.Option(..., "--input", "-i", help="Folder of *.npz cases (CVPR24 or CVPR25 layout) for the box round."),
    gts: Path = typer.Option(..., "--gts", help="Folder of ground-truth *.npz (key 'gts'), named like the cases."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for interactive.csv, interactive.json and dsc_per_click.png."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Click rounds after the box round (challenge: 5)."),
    per_round_process: bool = typer.Option(False, "--per-round-process/--one-process", help="One 'mcp-medsam predict' process per round, as the challenge times it. Default: one process, embeddings kept between rounds."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads. Default: all cores."),
    default_modality: Optional[str] = typer.Option(None, "--default-modality", help="Modality for cases whose file name has no known token."),
    tolerance: float = typer.Option(2.0, "--tolerance", min=0.0, help="NSD tolerance in mm (challenge: 2)."),
) -> None:
    """The CVPR 2025 interactive protocol: box round + click rounds with the challenge's click rule.

    Prints DSC and NSD per round and modality, DSC AUC and NSD AUC (trapezoid over the click rounds),
    final DSC/NSD, seconds per round and the 90 s per class budget. Exit status 1 when a case failed."""
    try:
        from .evaluation.interactive import evaluate_interactive as run, format_table
    except ImportError as exc:  # scipy and matplotlib are the optional "eval" extra
        _fail(RuntimeError(f"evaluate-interactive needs {exc.name}: pip install 'mcp-medsam[eval]'"))
    with _user_errors():
        result = run(inputs, gts, output, weights=weights, rounds=rounds, per_round_process=per_round_process,
                     threads=threads, default_modality=default_modality, tolerance=tolerance)
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
    precision: Optional[list[str]] = typer.Option(None, "--precision", callback=_precision, help="Precisions to compare (repeatable; fp32 always runs). Default: fp32 and every variant of the model folder this CPU runs."),
    gts: Optional[Path] = typer.Option(None, "--gts", help="Ground truth for the DSC column. Default: INPUT/../gts when it exists, else no DSC."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Another model folder run at fp32 in the same rotation (rows base-fp32, speed-up column xb): e.g. the same model exported with --no-fold. Default: none."),
) -> None:
    """Seconds per case and precision, warm and cold.

    Against the CPU's arithmetic floor (a benchmark, not a test).
    Prints per case and precision (fp32 and the folder's bf16 / INT8 variants, interleaved): FLOPs of the
    graph calls made, floor seconds (FLOPs / measured fp32 matmul throughput), warm and cold seconds and
    their floor ratios, the speed-up over fp32, the agreement of the labels with fp32's, the DSC, the peak
    RSS of a cold run, the cold start (cold - warm), and the PyTorch model's seconds side by side."""
    from .bench import format_report, run_bench
    from .errors import SegmentationError

    try:
        report = run_bench(inputs, weights=weights, cold=cold, torch_engine=_torch_engine() if with_torch else None,
                           threads=threads, max_batch=max_batch, json_path=json_path, precisions=precision or None,
                           gts=gts, baseline=baseline)
    except SegmentationError as exc:
        _fail(exc)
    typer.echo(format_report(report), nl=False)


@cli.command("bench-throughput")
def bench_throughput(
    inputs: Path = typer.Option(..., "--input", "-i", help="Folder of *.npz cases (e.g. the sample set)."),
    cases: Optional[int] = typer.Option(None, "--cases", min=1, help="Use this many cases, spread evenly over the sorted folder. Default: all."),
    parts: int = typer.Option(2, "--parts", min=1, help="Processes of one thread side by side (--num-parts P)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Workers of the --dask local:W mode."),
    with_dask: bool = typer.Option(True, "--dask/--no-dask", help="Include the --dask local:W mode (needs the dask extra)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Cases per minute: one process, parts, Dask workers.

    Cases per minute for one process (1 thread, all cores), P one-thread parts side by side and
    --dask local:W, one after another on the same cases (a benchmark, not a test; wall time includes
    model loads and cluster start-up)."""
    from .errors import SegmentationError
    from .throughput import format_report, run_throughput

    try:
        report = run_throughput(inputs, cases=cases, weights=weights, parts=parts, workers=workers, dask=with_dask,
                                json_path=json_path)
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
    precision: Optional[str] = typer.Option(None, "--precision", callback=_precision, help="The precision to compile, as a run would choose it. " + PRECISION_HELP),
) -> None:
    """Compile the graphs once into the cache.

    Later runs load the compiled graphs instead of compiling."""
    from .engine import warm_cache
    from .errors import SegmentationError

    try:
        folder = warm_cache(weights, cache_dir=cache_dir, precision=precision)
    except SegmentationError as exc:
        _fail(exc)
    typer.echo(f"compiled-model cache ready in {folder}")


@cli.command("verify-weights")
def verify_weights(
    folder: Optional[Path] = typer.Argument(None, help="Exported model folder (manifest.json). Default: $MCP_MEDSAM_WEIGHTS, else the weights installed with mcp-medsam."),
) -> None:
    """Check the model files against manifest.json.

    Hash every file manifest.json records and compare sizes and sha256 (one line per file).
    Exit status 0 when every file matches, 1 otherwise. Every model load checks the same, but hashes only the files whose size or modification time changed since they were last hashed."""
    from .engine import verify_weights as check
    from .errors import SegmentationError

    try:
        report = check(folder)
    except SegmentationError as exc:
        _fail(exc)
    for line in report.lines:
        typer.echo(line)
    if not report.ok:
        _fail(RuntimeError(f"{report.folder}: {report.problems} problem(s) in {report.checked} recorded file(s)"))
    typer.echo(f"{report.folder}: all {report.checked} recorded files match manifest.json")


@cli.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Any address other than loopback (127.0.0.1, ::1, localhost) needs a token."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    token: Optional[str] = typer.Option(None, "--token", envvar="MCP_MEDSAM_TOKEN", show_envvar=True, help="Every /v1 request must send 'Authorization: Bearer TOKEN' (else 401; /healthz and the page stay open); at least 16 characters. Set it in $MCP_MEDSAM_TOKEN rather than here: a command line is visible to every user in 'ps'. Default: none, loopback only."),
    max_upload_mb: float = typer.Option(512.0, "--max-upload-mb", help="Largest upload request body in MB (413 above)."),
    max_image_mb: float = typer.Option(1024.0, "--max-image-mb", help="Largest decoded image or volume in MB (uint8; 413 above)."),
    max_images: int = typer.Option(16, "--max-images", help="Images held at once (413 for one more; DELETE frees a place)."),
    max_boxes: int = typer.Option(64, "--max-boxes", help="Boxes per segment request (422 above)."),
    cache_mb: float = typer.Option(1024.0, "--cache-mb", help="Volume slice embeddings kept across requests, all volumes together, in MB (4 MB per slice with the default model)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", metavar="ORIGIN", help="Allow browser pages from this origin to call the API (repeatable). Default: no CORS headers."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", metavar="NAME", help="Without a token, answer requests for this Host name too (repeatable). Default: localhost, 127.0.0.1 and [::1] only (400 for others)."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a request body may pause before the request is dropped (408)."),
    shutdown_grace: float = typer.Option(30.0, "--shutdown-grace", help="Seconds running requests get at Ctrl-C / SIGTERM before they are answered 503."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Modality of nnInteractive sessions (/nninteractive) and of /v1 uploads that name none. Default: a session's volume with values below -500 is CT, else MR (the log says which); such an upload must name one."),
    sessions: int = typer.Option(4, "--sessions", help="nnInteractive sessions at once (503 for one more); each keeps slice embeddings of at most --cache-mb / --sessions."),
    session_idle_s: float = typer.Option(600.0, "--session-idle-s", help="An nnInteractive session is freed after this many seconds without an interaction."),
    session_liveness_s: float = typer.Option(60.0, "--session-liveness-s", help="An nnInteractive session is freed after this many seconds without any request (the client heartbeats at half of it)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for inference. Default: all cores."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO compiled-model cache. Default: $MCP_MEDSAM_CACHE or ~/.cache/mcp-medsam/openvino."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (critical, error, warning, info, debug)."),
    precision: Optional[str] = typer.Option(None, "--precision", callback=_precision, help=PRECISION_HELP),
) -> None:
    """HTTP service and web page for boxes on uploads.

    Upload an image or volume once, segment boxes on it (web page at /; extra 'serve').
    API: POST /v1/images, POST /v1/images/{id}/segment, GET /v1/images/{id}/slices/{z}, GET /v1/info, ...;
    OpenAPI at /docs. Ctrl-C stops it and deletes every upload."""
    from .errors import SegmentationError
    from .serve.config import ServeConfig
    from .serve.server import serve as run

    try:
        run(ServeConfig(host=host, port=port, token=token, max_upload_mb=max_upload_mb, max_image_mb=max_image_mb,
                        max_images=max_images, max_boxes=max_boxes, cache_mb=cache_mb, cors_origins=tuple(cors_origin),
                        allowed_hosts=tuple(allowed_host), body_timeout=body_timeout, shutdown_grace=shutdown_grace,
                        modality=modality, sessions=sessions, session_idle_s=session_idle_s,
                        session_liveness_s=session_liveness_s),
            weights=weights, threads=threads, cache_dir=cache_dir, log_level=log_level, precision=precision)
    except SegmentationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 1))


@cli.command("serve-bench")
def serve_bench(
    inputs: Path = typer.Option(..., "--input", "-i", help="Folder of CVPR24 *.npz cases: the 2D ones are uploaded and their boxes decoded."),
    clients: int = typer.Option(8, "--clients", min=1, help="Concurrent clients in the load phase."),
    seconds: float = typer.Option(30.0, "--seconds", min=0.0, help="Length of the load phase."),
    decodes: int = typer.Option(4, "--decodes", min=1, help="Single-box segment requests per upload."),
    weights: Optional[Path] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="The server's inference threads. Default: all cores."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Load check of 'serve' on loopback.

    A benchmark, not a test: requests/s, p50/p95 of a box decode
    and of an upload+embed, idle and under load, errors (exit 1 unless 0), the server's peak RSS."""
    from .errors import SegmentationError
    from .serve.loadcheck import format_report, run_load_check

    try:
        report = run_load_check(inputs, clients=clients, seconds=seconds, decodes=decodes, weights=weights,
                                threads=threads, json_path=json_path)
    except SegmentationError as exc:
        _fail(exc)
    typer.echo(format_report(report), nl=False)
    raise typer.Exit(1 if report.errors else 0)


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@cli.command(context_settings=_PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train MCP-MedSAM with the paper's recipe.

    Options: mcp-medsam train --help (export extra).
    Multi-GPU or multi-node: torchrun --nproc_per_node N -m mcp_medsam_torch.train train ..."""
    _torch_side("mcp_medsam_torch.train.loop", "train", ctx)
    from mcp_medsam_torch.train.__main__ import main as train_main

    raise typer.Exit(train_main(["train", *ctx.args], prog="mcp-medsam"))


@cli.command(context_settings=_PASSTHROUGH, add_help_option=False)
def distill(ctx: typer.Context) -> None:
    """Distil the warm start from LiteMedSAM, then fine-tune.

    The default model's recipe. Options: mcp-medsam distill --help (export extra)."""
    _torch_side("mcp_medsam_torch.train.distill", "distill", ctx)
    from mcp_medsam_torch.train.__main__ import main as train_main

    raise typer.Exit(train_main(["distill", *ctx.args], prog="mcp-medsam"))


@cli.command("train-clicks", context_settings=_PASSTHROUGH, add_help_option=False)
def train_clicks(ctx: typer.Context) -> None:
    """Teach the decoder foreground/background clicks (simulated CVPR 2025 sessions).

    Options: mcp-medsam train-clicks --help (export extra)."""
    _torch_side("mcp_medsam_torch.train.clicks", "train-clicks", ctx)
    from mcp_medsam_torch.train.__main__ import main as train_main

    raise typer.Exit(train_main(["train-clicks", *ctx.args], prog="mcp-medsam"))


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
