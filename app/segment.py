"""The runner behind ``mcp-medsam segment``: medical files in, label images in the same format and geometry out.

Built on :class:`~mcp_medsam.segmenter.Segmenter` and :mod:`mcp_medsam.io.medical`. Per input it
reads the file (or DICOM series folder), converts the intensities as the challenge did, takes the
box prompts from ``--box``, a JSON file or a label image, segments, and writes the labels
atomically. A bad input gets one ``error:`` line and writes nothing; the other inputs still run.

Boxes are voxel indices of the (z, y, x) array, inclusive: ``x0, y0, x1, y1`` (2D) or
``x0, y0, z0, x1, y1, z1`` (3D), x = column, y = row, z = slice. Output labels are the box
indices 1..N, or with ``--boxes-from`` the label image's own values.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import InputError, SegmentationError, UsageError
from .io import medical
from .io.atomic import remove_stale_temps
from .io.npz import DEFAULT_MAX_IMAGE_BYTES
from .io.paths import check_output_dir, check_output_file, same_place
from .prompts import label_dtype
from .segmenter import Segmenter
from .shards import describe_redo, labels_output_problem, resolve_part


@dataclass
class SegmentResult:
    input: str
    output: str = ""
    seconds: float = 0.0
    boxes: int = 0
    status: str = "ok"  # ok, failed (a problem with the input), error (an internal error), skipped (output kept)
    message: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Prompts:
    """Where the boxes of each input come from: exactly one of the fields is set (none: an .npz
    case's own boxes).

    boxes: (N, 4|6) float64 for every input (``--box``, or a JSON list); per_input: input file
    name -> (N, 4|6) (a JSON object); labels: a label image, or a folder of them named like the
    inputs (``--boxes-from``), with ``min_size`` and ``threshold`` as :func:`medical.read_labels`
    and :func:`medical.boxes_from_labels` take them.
    """

    boxes: np.ndarray | None = None
    per_input: dict[str, np.ndarray] | None = None
    labels: Path | None = None
    min_size: int = medical.MIN_OBJECT_SIZE
    threshold: float | None = None


# ---------------------------------------------------------------- command line parsing


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected numbers separated by commas") from None
    if not np.isfinite(values).all():
        raise UsageError(f"{what} {text!r}: numbers must be finite")
    return values


def parse_boxes(texts: Sequence[str]) -> np.ndarray:
    """``--box`` values (``"x0,y0,x1,y1"`` or ``"x0,y0,z0,x1,y1,z1"``) -> (N, 4|6) float64."""
    rows = [_numbers(t, "--box") for t in texts]
    for t, r in zip(texts, rows):
        if len(r) not in (4, 6):
            raise UsageError(f"--box {t!r}: {len(r)} numbers; expected x0,y0,x1,y1 (2D) or x0,y0,z0,x1,y1,z1 (3D)")
    if len({len(r) for r in rows}) > 1:
        raise UsageError("--box: every box needs the same number of coordinates (4 for 2D, 6 for 3D)")
    return np.asarray(rows, dtype=np.float64)


def parse_window(text: str | None) -> tuple[float, float] | None:
    """``--window LEVEL,WIDTH`` -> (level, width)."""
    if text is None:
        return None
    values = _numbers(text, "--window")
    if len(values) != 2 or values[1] <= 0:
        raise UsageError(f"--window {text!r}: expected LEVEL,WIDTH with WIDTH > 0 (e.g. 40,400)")
    return values[0], values[1]


def _box_rows(raw: object, where: str) -> np.ndarray:
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: expected a non-empty list of boxes")
    if not all(isinstance(b, list) and len(b) in (4, 6) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 for v in b) for b in raw):
        raise InputError(f"{where}: every box is a list of 4 (x0, y0, x1, y1) or 6 (x0, y0, z0, x1, y1, z1) numbers")
    if len({len(b) for b in raw}) > 1:
        raise InputError(f"{where}: every box needs the same number of coordinates")
    return np.asarray(raw, dtype=np.float64)


def read_boxes_file(path: Path) -> Prompts:
    """``--boxes FILE.json``: ``{"boxes": [[...], ...]}`` (every input) or ``{"boxes": {"NAME": [[...]], ...}}``
    (per input file name). Raises InputError naming the file."""
    where = f"boxes file {path.name}"
    if Path(path).exists() and not _regular(Path(path)):
        raise InputError(f"boxes file {path} is not a regular file (a FIFO?); refused")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read boxes file {path} ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "boxes" not in data:
        raise InputError(f'{where}: expected an object {{"boxes": [[x0, y0, x1, y1], ...]}}')
    raw = data["boxes"]
    if isinstance(raw, dict):
        return Prompts(per_input={str(k): _box_rows(v, f"{where}, {k}") for k, v in raw.items()})
    return Prompts(boxes=_box_rows(raw, where))


# ---------------------------------------------------------------- outputs


def _format_suffix(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    s = "." + fmt.lower().lstrip(".")
    if s not in medical.OUTPUT_SUFFIXES:
        accepted = ", ".join(x.lstrip(".") for x in medical.OUTPUT_SUFFIXES)
        raise UsageError(f"--format {fmt!r}: expected one of {accepted}")
    return s


LABEL_NAME_SUFFIXES = ("_label", "_labels", "_mask", "_seg", "_gt")  # label files beside or named like images
IMAGE_NAME_SUFFIXES = ("_image", "_img")  # dropped from an image's name when its label file is looked for


def _names_a_file(output: str | Path, n_inputs: int) -> bool:
    """Whether OUTPUT names one result file (by a label suffix) rather than a folder.

    A folder is an existing folder, a path written with a trailing ``/``, or (several inputs) a new
    name without an extension; a file has a label suffix. Refused (UsageError, before the model
    loads): an image type labels are not written as (``.jpg``, ``.mhd``, ...), any other extension
    (``x.vtk``), and for one input a new name without extension (a file or a folder?)."""
    text = str(output)
    path = Path(output)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return False
    if path.name.lower().endswith(medical.OUTPUT_SUFFIXES):
        return True
    if medical.suffix(path):  # .jpg, .mhd, .nhdr, .dcm: an image type labels are not written as
        try:
            medical.label_suffix(path)  # raises, saying why
        except InputError as exc:
            raise UsageError(str(exc)) from None
    if path.suffix:
        raise UsageError(f"-o {text}: segment cannot write {path.suffix} files; give a file name ending in one of "
                         f"{', '.join(medical.OUTPUT_SUFFIXES)}, or a folder (an existing one, or end it with /)")
    if n_inputs == 1:
        raise UsageError(f"-o {text}: neither an existing folder nor a file name with an extension; give a file "
                         f"name ending in one of {', '.join(medical.OUTPUT_SUFFIXES)}, or end it with / for a "
                         f"new folder")
    return False


def plan_outputs(inputs: Sequence[Path], output: str | Path, out_format: str | None = None, *,
                 batch: bool = False) -> list[Path]:
    """The result path of each input: OUTPUT itself (one input, OUTPUT with a label suffix), else
    OUTPUT/<input name><suffix>, the suffix being --format or the input's own (:func:`medical.output_suffix`).
    batch: the inputs came from a folder, so OUTPUT is a folder even for one of them."""
    fmt = _format_suffix(out_format)
    as_file = _names_a_file(output, 2 if batch else len(inputs))
    output = Path(output)
    if as_file:
        if len(inputs) > 1 or batch:
            raise UsageError(f"{len(inputs)} input(s) from a folder or several: OUTPUT is a folder, not {output.name}"
                             if batch else f"{len(inputs)} inputs: OUTPUT is a folder, not {output.name}")
        if fmt is not None:
            raise UsageError("--format applies when OUTPUT is a folder; here OUTPUT's own extension names the format")
        return [output]
    outs = [output / (medical.stem(p) + (fmt or medical.output_suffix(p))) for p in inputs]
    seen: dict[Path, Path] = {}
    for p, o in zip(inputs, outs):
        if o in seen:
            raise UsageError(f"inputs {seen[o]} and {p} would both be written as {o.name}")
        seen[o] = p
    return outs


def _is_label_name(path: Path) -> bool:
    return medical.stem(path).lower().endswith(LABEL_NAME_SUFFIXES)


def expand_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """INPUTs as the files to segment, and one note per folder taken as a batch.

    A folder holding image files (any accepted type but ``.dcm``) and no ``.dcm`` file at its top is a
    batch of those files, sorted; files whose name ends in a label suffix (``_label``, ``_mask``,
    ``_seg``, ``_gt``) are label images, not inputs, and are left out. Any other folder is a DICOM
    series. Files are kept as given."""
    files: list[Path] = []
    notes: list[str] = []
    for p in inputs:
        if not p.is_dir():
            files.append(p)
            continue
        try:
            entries = sorted(e for e in p.iterdir() if medical.suffix(e))
        except OSError:
            files.append(p)  # read_image says why
            continue
        if any(medical.suffix(e) == ".dcm" for e in entries):
            files.append(p)
            continue
        images = [e for e in entries if _regular(e) and not _is_label_name(e)]
        if not images:
            files.append(p)  # no image file: a DICOM series folder (files without extension), or its error
            continue
        labels = [e.name for e in entries if _regular(e) and _is_label_name(e)]
        others = [e.name for e in entries if not _regular(e)]
        note = f"{p}: a folder of {len(images)} image file(s), segmented as a batch: " + _names(images)
        if labels:
            note += f"; left out as label images: {_names(labels)}"
        if others:
            note += f"; not regular files, left out: {_names(others)}"
        notes.append(note)
        files += images
    return files, notes


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


def _names(items: Sequence[Path | str], most: int = 8) -> str:
    names = [Path(i).name for i in items]
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def label_file_for(image_path: Path, labels: Path) -> Path:
    """The label image of an input: ``labels`` itself when it is a file, else the file in the folder
    ``labels`` with the input's file name, or the input's name with another image suffix, or that name
    (less ``_image``/``_img``) followed by ``_label``, ``_labels``, ``_mask``, ``_seg`` or ``_gt``.
    The input itself (the same file, by identity) is never its own label image."""
    if not labels.is_dir():
        if image_path.exists() and same_place(labels, image_path):
            raise InputError(f"--boxes-from {labels} is the input itself; give the label image drawn on it")
        return labels
    name = medical.stem(image_path)
    low = name.lower()
    base = next((name[: -len(s)] for s in IMAGE_NAME_SUFFIXES if low.endswith(s)), name)
    wanted = {name.lower()} | {(n + s).lower() for n in {name, base} for s in LABEL_NAME_SUFFIXES}
    found = sorted(p for p in labels.iterdir() if p.is_file() and medical.suffix(p)
                   and medical.stem(p).lower() in wanted)
    itself = [p for p in found if image_path.exists() and same_place(p, image_path)]
    found = [p for p in found if p not in itself]
    if labels / image_path.name in found:
        return labels / image_path.name  # the same file name: no other candidate competes
    if not found:
        if itself:
            raise InputError(f"the only label image for {image_path.name} in {labels} is the input itself; name its "
                             f"label image {base}_label.*, _mask, _seg or _gt (or keep labels in another folder)")
        raise InputError(f"no label image for {image_path.name} in {labels} (looked for {name}.* and "
                         f"{base}_label/_mask/_seg/_gt.*)")
    if len(found) > 1:
        exact = [p for p in found if medical.stem(p) == name]
        if len(exact) == 1:
            return exact[0]
        raise InputError(f"several label images for {image_path.name} in {labels}: {', '.join(p.name for p in found)}")
    return found[0]


# ---------------------------------------------------------------- one input


def _relabel(segs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Box indices 1..N -> the label values the boxes came from."""
    lut = np.zeros(len(values) + 1, dtype=label_dtype(int(values.max())))
    lut[1:] = values
    return lut[segs]


def _boxes_for(path: Path, image: medical.MedicalImage, prompts: Prompts, series: str | None,
               max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(N, 4|6) boxes for one input, the label values they stand for (None: box indices), notes."""
    notes: list[str] = []
    if prompts.labels is not None:
        lab = medical.read_prompt_labels(label_file_for(path, prompts.labels), threshold=prompts.threshold,
                                         series=series, max_bytes=max_bytes, notes=notes)
        medical.check_same_grid(lab, image)
        every = medical.label_boxes(lab.array)
        kept = every.at_least(prompts.min_size)
        small = every.values[every.sizes < prompts.min_size]
        if len(small) and len(kept.values):
            shown = ", ".join(str(v) for v in small[:10]) + (", ..." if len(small) > 10 else "")
            notes.append(f"label(s) {shown} of {lab.source.name} have fewer than {prompts.min_size} "
                         f"{'voxels' if image.is_3d else 'pixels'}: no box (--min-size)")
        boxes, values = medical.boxes_from_labels(lab.array, min_size=prompts.min_size)
        return boxes, values, notes
    if prompts.per_input is not None:
        boxes = prompts.per_input.get(path.name, prompts.per_input.get(medical.stem(path)))
        if boxes is None:
            raise InputError(f"the boxes file has no entry {path.name!r}")
    elif prompts.boxes is not None:
        boxes = prompts.boxes
    elif image.boxes is not None:
        boxes = image.boxes
    else:
        raise InputError("no boxes: give --box, --boxes or --boxes-from")
    width = 6 if image.is_3d else 4
    if boxes.shape[1] != width:
        kind = "a volume needs x0,y0,z0,x1,y1,z1" if image.is_3d else "a 2D image needs x0,y0,x1,y1"
        raise InputError(f"boxes of {boxes.shape[1]} coordinates: {kind}")
    return boxes, None, notes


@contextmanager
def _volume_bar(name: str) -> Iterator[Callable[[int, int], None] | None]:
    """On a terminal, a bar of one input's box-slices as they are decoded (a volume takes minutes); else
    None: the input's line after it ends is the progress (a log stays one line per input)."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, desc=name[:50], unit="box-slice", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def segment_file(segmenter: Segmenter, path: Path, out: Path, *, modality: str, prompts: Prompts,
                 series: str | None = None, window: tuple[float, float] | None = None,
                 skip_existing: bool = False, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
                 progress: Callable[[int, int], None] | None = None) -> SegmentResult:
    """Read, convert, prompt, segment and write one input; never raises for a problem with the input.

    skip_existing: an existing output that reads back as labels on the input's grid is kept (status
    ``skipped``); any other is redone. max_bytes: the largest decoded input or label image
    (:func:`medical.read_image`, checked from the header)."""
    t0 = time.perf_counter()
    result = SegmentResult(input=str(path), output=str(out))
    try:
        image = medical.read_image(path, series=series, max_bytes=max_bytes)
        redo = labels_output_problem(out, image) if skip_existing and out.is_file() else None
        if skip_existing and out.is_file() and redo is None:
            result.status, result.message = "skipped", "the output exists and reads back on the input's grid"
            result.seconds = time.perf_counter() - t0
            return result
        pixels = medical.to_uint8(image, modality, window=window)
        boxes, values, result.notes = _boxes_for(path, image, prompts, series, max_bytes)
        if redo is not None:
            result.notes.insert(0, describe_redo(out, redo))
        if image.is_3d:
            segs = segmenter.segment_volume(pixels, boxes, modality, progress=progress)
        else:
            segs = segmenter.segment_image(pixels, boxes, modality)
        if values is not None:
            segs = _relabel(segs, values)
        medical.write_labels(out, segs, image)
        result.boxes = len(boxes)
    except SegmentationError as exc:
        result.status, result.message = "failed", str(exc)
    except MemoryError:
        result.status, result.message = "failed", "out of memory"
    except Exception as exc:  # an internal error must not take the other inputs down
        result.status, result.message = "error", f"{exc.__class__.__name__}: {exc}"
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- the command


def segment(inputs: Sequence[Path], output: str | Path, *, modality: str, box: Sequence[str] = (),
            boxes: Path | None = None, boxes_from: Path | None = None, series: str | None = None,
            window: str | None = None, min_size: int = medical.MIN_OBJECT_SIZE, mask_threshold: float | None = None,
            out_format: str | None = None, weights: Path | None = None, backend: str = "openvino",
            threads: int | None = None, max_batch: int = 8, cache_dir: Path | None = None,
            segmenter: Segmenter | None = None, num_parts: int = 1, part_id: int | str | None = None,
            skip_existing: bool = False, precision: str | None = None, overwrite: bool = False,
            max_image_mb: float = DEFAULT_MAX_IMAGE_BYTES / 2 ** 20) -> list[SegmentResult]:
    """``mcp-medsam segment``: check the options and output places, load the model, run every input.

    Prints one line per input (``INPUT -> OUTPUT (N boxes, S s)`` on stdout, ``error: INPUT: why``
    on stderr). Raises UsageError for options that do not fit together, InputError/ModelError for
    a problem found before any input runs (an output place, the boxes file, the modality, the model).
    num_parts, part_id: segment only part I of N of the inputs sorted by path
    (:func:`mcp_medsam.shards.resolve_part`); skip_existing: keep outputs that read back whole;
    precision: as :meth:`Segmenter.load`; overwrite: replace existing outputs (else an existing
    output is refused before the model loads); max_image_mb: the largest decoded input or label
    image, checked from its header before decoding. A folder INPUT holding image files is a batch
    of them (:func:`expand_inputs`). OUTPUT (str keeps a trailing ``/``): see :func:`plan_outputs`.
    Output folders are created when the first result is written.
    """
    if not inputs:
        raise UsageError("no INPUT given")
    given_inputs = [Path(p) for p in inputs]
    inputs, batch_notes = expand_inputs(given_inputs)
    output_text = str(output)
    output = Path(output)
    if not max_image_mb > 0:
        raise UsageError(f"--max-image-mb {max_image_mb:g} must be above zero")
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing cannot be combined")
    part = resolve_part(num_parts, part_id)
    given = [name for name, v in (("--box", box), ("--boxes", boxes), ("--boxes-from", boxes_from)) if v]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be combined: give one of --box, --boxes, --boxes-from")
    if not given and any(medical.suffix(p) != medical.NPZ_SUFFIX for p in inputs):
        raise UsageError("give the boxes: --box, --boxes FILE.json or --boxes-from LABELS (an .npz case has its own)")
    if boxes_from is not None and len(inputs) > 1 and not Path(boxes_from).is_dir():
        raise UsageError(f"{len(inputs)} inputs: --boxes-from is a folder of label images named like them")
    if min_size < 1:
        raise UsageError("--min-size must be 1 or more")
    win = parse_window(window)
    outs = plan_outputs(inputs, output_text, out_format, batch=bool(batch_notes))
    if box:
        prompts = Prompts(boxes=parse_boxes(box))
    elif boxes is not None:
        prompts = read_boxes_file(Path(boxes))
    else:
        prompts = Prompts(labels=None if boxes_from is None else Path(boxes_from), min_size=min_size,
                          threshold=mask_threshold)
    sources = [*given_inputs, *inputs, *([Path(boxes_from)] if boxes_from is not None else [])]
    if len(outs) == 1 and outs[0] == output:
        check_output_file(output, inputs=sources)
    else:
        check_output_dir(output, inputs=[p for p in sources if p.is_dir()])
        for o in outs:
            check_output_file(o, inputs=sources)
    if not (overwrite or skip_existing):
        existing = [o for _, o in part.select(list(zip(inputs, outs)), key=lambda pair: str(pair[0])) if o.exists()]
        if existing:
            raise InputError(f"{_names(existing)} exist{'s' if len(existing) == 1 else ''} already; refusing to "
                             f"replace {'it' if len(existing) == 1 else 'them'} (--overwrite replaces, "
                             f"--skip-existing keeps what reads back whole)")
    for folder in {o.parent for o in outs}:
        remove_stale_temps(folder)
    for note in batch_notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if segmenter is None:
        segmenter = Segmenter.load(weights, backend=backend, threads=threads, cache_dir=cache_dir,
                                   max_batch=max_batch, precision=precision)
    segmenter.modality_row(modality)  # an unknown modality fails once, before any input
    results = []
    mine = part.select(list(zip(inputs, outs)), key=lambda pair: str(pair[0]))
    for i, (path, out) in enumerate(mine, start=1):
        with _volume_bar(f"{path.name} ({i}/{len(mine)})") as progress:
            r = segment_file(segmenter, path, out, modality=modality, prompts=prompts, series=series, window=win,
                             skip_existing=skip_existing, max_bytes=int(max_image_mb * 2 ** 20), progress=progress)
        for note in r.notes:
            print(f"note: {path}: {note}", file=sys.stderr, flush=True)
        if r.status == "ok":
            print(f"{path} -> {out} ({r.boxes} boxes, {r.seconds:.2f} s)", flush=True)
        elif r.status == "skipped":
            print(f"{path} -> {out} (kept from an earlier run)", flush=True)
        else:
            print(f"error: {path}: {r.message}", file=sys.stderr, flush=True)
        results.append(r)
    return results
