"""The folder runner behind ``mcp-medsam predict``: NPZ cases (CVPR24 or CVPR25 layout) in, ``segs`` NPZ files out.

Built on :class:`~mcp_medsam.segmenter.Segmenter`: per case it reads the file, takes the modality
from the file name (the official rule), calls ``segment_image`` / ``segment_volume``, and writes the
result atomically. One bad case gets one line and a "failed" row in the timing CSV (and any output
of the same name from an earlier run is removed); the others run.

Before the model loads, the folders are checked (:mod:`mcp_medsam.io.paths`: an output folder
that is the input folder, inside it or around it, a file, under a file or not writable is refused)
and temp files left in them by killed runs are removed. SIGTERM or SIGINT abandon the case in
flight (its temp file removed) and end the run with :class:`~mcp_medsam.io.atomic.Interrupted`;
a finished case's output and its timing row are committed together.

For archives beyond one process (:mod:`mcp_medsam.shards`, :mod:`mcp_medsam.cluster`): ``num_parts``
/ ``part_id`` run one part of the sorted case list and write its rows to ``timing.part-I-of-N.csv``
(merged into the timing CSV by :func:`merge_timing`, automatically when the last part finishes);
``skip_existing`` keeps a finished output that reads back whole with the right shape (row status
``skipped``) and redoes any other; ``dask`` runs the cases as Dask tasks on a cluster.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, SegmentationError, UnknownModality, UsageError
from .io.atomic import (Interrupted, deferred_signals, folder_lock, remove_stale_temps, stop_on_signals, write_npz,
                        write_text)
from .io.npz import DEFAULT_MAX_IMAGE_BYTES, Case, load_case, segs_layout
from .io.paths import check_input_dir, check_output_dir, check_output_file, list_cases
from .modality import modality_token
from .prompts import covered_slices
from .segmenter import Segmenter
from .shards import Part, describe_redo, npz_output_problem, part_timing_files, part_timing_path, resolve_part


@dataclass
class CaseResult:
    case: str
    seconds: float = 0.0
    boxes: int = 0
    slices: int = 0  # distinct slices segmented (1 for a 2D image)
    status: str = "ok"  # ok, failed (a problem with the case), error (an internal error), skipped (output kept)
    message: str = ""
    gflops: float = 0.0
    graph_seconds: float = 0.0  # inside graph calls; the rest is reading, pre/post-processing, writing


TIMING_FIELDS = ("case", "seconds", "boxes", "slices", "status", "message")


def _row(r: CaseResult) -> list[str]:
    return [r.case, f"{r.seconds:.3f}", str(r.boxes), str(r.slices), r.status, r.message]


def timing_csv(results: list[CaseResult]) -> str:
    return _csv([_row(r) for r in results])


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(TIMING_FIELDS)
    wr.writerows(rows)
    return buf.getvalue()


def _result(row: list[str]) -> CaseResult:
    """A timing row read back (seconds, boxes and slices as numbers; 0 where unreadable)."""
    def number(text: str, kind: type) -> Any:
        try:
            return kind(text)
        except ValueError:
            return kind(0)

    return CaseResult(case=row[0], seconds=number(row[1], float), boxes=number(row[2], int),
                      slices=number(row[3], int), status=row[4], message=row[5])


def _read_rows(path: Path) -> dict[str, list[str]]:
    """The rows of an existing timing CSV by case (none if it is missing or not one of ours)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not rows or tuple(rows[0]) != TIMING_FIELDS:
        return {}
    return {r[0]: r for r in rows[1:] if len(r) == len(TIMING_FIELDS)}


def write_timing(path: Path, results: list[CaseResult]) -> None:
    """Merge this run's rows into the timing CSV, atomically and under a lock on its folder: rows of
    other cases (an earlier run's, a concurrent run's) are kept, this run's replace those of its cases."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # made with the first row, not before the model loads
        with folder_lock(path.parent):
            rows = _read_rows(path)
            rows.update((r.case, _row(r)) for r in results)
            write_text(path, _csv(list(rows.values())))
    except OSError as exc:
        raise InputError(f"cannot write the timing CSV {path} ({exc.strerror or exc})") from None


def earlier_results(*timings: Path) -> dict[str, CaseResult]:
    """The rows of earlier runs by case, from these timing CSVs (a later file's row wins)."""
    rows: dict[str, CaseResult] = {}
    for path in timings:
        rows.update((case, _result(row)) for case, row in _read_rows(path).items())
    return rows


# ---------------------------------------------------------------- merging the parts' timing files


@dataclass
class MergeReport:
    timing: Path  # the merged file
    num_parts: int
    rows: int  # rows taken from the part files
    missing: list[str]  # cases of the given list without a row in any part file


def _part_rows(parts: dict[int, Path]) -> dict[str, list[str]]:
    """Every part file's rows by case. A case in several files (the folder changed between parts):
    a row of a case that ran beats a ``skipped`` one, else the most recently written file's row."""
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    rows: dict[str, list[str]] = {}
    for path in sorted(parts.values(), key=mtime):
        for case, row in _read_rows(path).items():
            old = rows.get(case)
            if old is None or not (row[4] == "skipped" and old[4] != "skipped"):
                rows[case] = row
    return rows


def _merge_locked(timing: Path, num_parts: int, parts: dict[int, Path], cases: Sequence[str] | None, *,
                  strict: bool) -> MergeReport | None:
    """Merge under the folder lock (held by the caller). Not strict: None (nothing written) unless
    every case of ``cases`` has a row. Rows of other cases already in ``timing`` are kept; the merged
    file is sorted by case, as one process over the sorted folder writes it."""
    rows = _part_rows(parts)
    missing = [c for c in cases if c not in rows] if cases is not None else []
    if missing and not strict:
        return None
    merged = _read_rows(timing)
    merged.update(rows)
    write_text(timing, _csv([merged[c] for c in sorted(merged)]))
    return MergeReport(timing=timing, num_parts=num_parts, rows=len(rows), missing=missing)


def merge_timing(timing: Path, *, num_parts: int | None = None, cases: Sequence[str] | None = None) -> MergeReport:
    """``mcp-medsam timing merge``: merge the ``STEM.part-I-of-N.csv`` files beside ``timing`` into it.

    Every part 0..N-1 must have written its file (InputError naming the missing ones, nothing
    written); with several splits there (part files of different N), ``num_parts`` says which.
    cases: the full case list, to report cases that no part has a row for yet (``missing``).
    """
    timing = Path(timing)
    found = part_timing_files(timing)
    pattern = f"{timing.stem}.part-I-of-N{timing.suffix}"
    if num_parts is None:
        if not found:
            raise InputError(f"no part timing files ({pattern}) beside {timing}")
        if len(found) > 1:
            raise UsageError(f"part timing files of {len(found)} splits beside {timing} "
                             f"(--num-parts {', '.join(map(str, sorted(found)))}): pass --num-parts")
        num_parts = next(iter(found))
    parts = found.get(num_parts, {})
    absent = [i for i in range(num_parts) if i not in parts]
    if absent:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
        raise InputError(f"part(s) {shown} of {num_parts} have written no timing file beside {timing} yet "
                         f"({pattern}); run them first (nothing merged)")
    try:
        with folder_lock(timing.parent):
            report = _merge_locked(timing, num_parts, parts, cases, strict=True)
    except OSError as exc:
        raise InputError(f"cannot write the timing CSV {timing} ({exc.strerror or exc})") from None
    assert report is not None
    return report


def merge_timing_files(outputs: Path | None, *, timing: Path | None = None, num_parts: int | None = None,
                       inputs: Path | None = None) -> MergeReport:
    """``mcp-medsam timing merge OUTPUT``: :func:`merge_timing` on ``OUTPUT/timing.csv`` (or ``timing``);
    inputs: the input folder, whose cases without a row are reported in ``missing``."""
    if timing is None:
        if outputs is None:
            raise UsageError("give the output folder (OUTPUT) or --timing FILE")
        if not Path(outputs).is_dir():
            raise InputError(f"output folder {outputs} is not a folder")
        timing = Path(outputs) / "timing.csv"
    cases = [p.name for p in scan_cases(inputs)[0]] if inputs is not None else None
    return merge_timing(timing, num_parts=num_parts, cases=cases)


def merge_when_complete(timing: Path, part: Part, cases: Sequence[str]) -> MergeReport | None:
    """After a part finished: merge the parts' files into ``timing`` when together they hold a row
    for every case of ``cases`` (this part was the last to finish); None when parts are still due."""
    try:
        with folder_lock(timing.parent):
            parts = part_timing_files(timing).get(part.num_parts, {})
            return _merge_locked(timing, part.num_parts, parts, cases, strict=False) if parts else None
    except OSError as exc:
        raise InputError(f"cannot write the timing CSV {timing} ({exc.strerror or exc})") from None


def case_modality(segmenter: Segmenter, name: str, default: str | None) -> str:
    """The modality of a case file: the token after ``2DBox_``/``3DBox_`` (aliases as the official
    pipeline; the first token for CVPR25 names such as ``CT_...``), else ``default`` (already checked by
    the caller), else UnknownModality."""
    token = modality_token(name)
    if token in segmenter.modalities:
        return token
    if default is not None:
        return default
    raise UnknownModality(f"unknown modality {token!r} in the file name; accepted: "
                          f"{', '.join(segmenter.modalities)} (or pass --default-modality)")


def segment_case(segmenter: Segmenter, case: Case, modality: str) -> np.ndarray:
    """(H, W) or (D, H, W) labels of one loaded case (CVPR25: each box from its ``z_mid``, label = target
    index + 1). A click round (``clicks``) is segmented with the boxes and every click so far
    (:meth:`Segmenter.refine_volume` from ``prev_pred`` in 3D); a box-only model does the box round
    and says so in the case's notes."""
    clicks = case.clicks > 0
    if clicks and not segmenter.supports_points:
        case.notes += ("clicks ignored: the model takes box prompts only, so this is the box round",)
        clicks = False
    if case.is_3d and clicks:
        segs = segmenter.refine_volume(case.image, case.boxes, modality, points=case.points,
                                       point_labels=case.point_labels, prev=case.prev_by_box(), starts=case.starts)
    elif case.is_3d:
        segs = segmenter.segment_volume(case.image, case.boxes, modality, starts=case.starts)
    elif clicks:
        segs = segmenter.segment_image(case.image, case.boxes, modality, points=case.points,
                                       point_labels=case.point_labels)
    else:
        segs = segmenter.segment_image(case.image, case.boxes, modality)
    return case.relabel(segs)


def _resume(path: Path, out: Path, png: Path | None) -> tuple[bool, str]:
    """(keep, note): whether an existing output of the case stands (reads back whole, with the shape
    and dtype the case gives, and its overlay exists when one is asked for); else why it is redone."""
    if not out.is_file():
        return False, ""
    try:
        shape, dtype = segs_layout(path)
    except InputError:
        return False, ""  # the case itself is bad: run it, it fails with its own message
    why = npz_output_problem(out, shape, dtype)
    if why is None and png is not None and not png.is_file():
        why = f"its overlay {png.name} is missing"
    return why is None, "" if why is None else describe_redo(out, why)


def _skipped(name: str, earlier: CaseResult | None, seconds: float) -> CaseResult:
    """The row of a case whose output stands: the earlier run's seconds, boxes and slices when its
    row is known, so that a resumed run's timing CSV still tells what each case took."""
    if earlier is not None and earlier.status in ("ok", "skipped"):
        return CaseResult(case=name, seconds=earlier.seconds, boxes=earlier.boxes, slices=earlier.slices,
                          status="skipped", message="output of an earlier run kept (seconds from its row)")
    return CaseResult(case=name, seconds=seconds, status="skipped",
                      message="output of an earlier run kept (no earlier row: seconds of the check)")


def run_case(segmenter: Segmenter, path: Path, out_dir: Path, *, default_modality: str | None = None,
             overlays: Path | None = None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
             record: Callable[[CaseResult], None] | None = None, skip_existing: bool = False,
             earlier: CaseResult | None = None) -> CaseResult:
    """Load, segment and write one case; never raises for a problem with the case itself.

    The output (or, for a failed case, the removal of an earlier output of that name) and
    ``record(result)`` run with SIGTERM/SIGINT held back, so an interrupted run never leaves an
    output without its record; the computation before it can be interrupted at any point.
    skip_existing: an output that stands (:func:`_resume`) is kept and the row says ``skipped``
    (with ``earlier``'s figures, the case's row of an earlier run); any other output is redone.
    """
    t0 = time.perf_counter()
    out, png = out_dir / path.name, (overlays / f"{path.stem}.png" if overlays is not None else None)
    redo = ""
    if skip_existing:
        keep, redo = _resume(path, out, png)
        if keep:
            result = _skipped(path.name, earlier, time.perf_counter() - t0)
            if record is not None:
                record(result)
            return result
    stats, manifest = segmenter.engine.stats, segmenter.manifest
    flops0, graph0 = stats.gflops(manifest), sum(stats.seconds.values())
    segs, case = None, None
    try:
        case = load_case(path, max_image_bytes=max_image_bytes)
        segs = segment_case(segmenter, case, case_modality(segmenter, path.name, default_modality))
        result = CaseResult(case=path.name, boxes=len(case.boxes), message=" ".join((redo, *case.notes)).strip(),
                            slices=covered_slices(case.boxes) if case.is_3d else 1)
    except SegmentationError as exc:
        result = CaseResult(case=path.name, status="failed", message=str(exc))
    except MemoryError:
        result = CaseResult(case=path.name, status="failed", message="out of memory")
    except Exception as exc:  # an internal error must not take the other cases down
        result = CaseResult(case=path.name, status="error", message=f"{exc.__class__.__name__}: {exc}")
    with deferred_signals():
        if segs is not None:
            try:
                write_npz(out, segs=segs)
                if png is not None:
                    from .overlay import write_overlay

                    write_overlay(png, case, segs)
            except OSError as exc:
                result = CaseResult(case=path.name, status="failed",
                                    message=f"cannot write {exc.filename or out} ({exc.strerror or exc})")
        if result.status != "ok":
            for stale in (out, png):  # an earlier run's result must not pass for this one's
                if stale is not None:
                    try:
                        stale.unlink(missing_ok=True)
                    except OSError:
                        pass
        result.seconds = time.perf_counter() - t0
        result.gflops = stats.gflops(manifest) - flops0
        result.graph_seconds = sum(stats.seconds.values()) - graph0
        if record is not None:
            record(result)
    return result


def scan_cases(inputs: Path) -> tuple[list[Path], list[str]]:
    """The ``*.npz`` cases of a folder, sorted, and a note per entry of that name that is not a file;
    InputError when the folder is missing, a file, unreadable or holds no case."""
    folder = check_input_dir(inputs)
    files, skipped = list_cases(folder)
    if not files:
        raise InputError(f"no .npz cases in {inputs}" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return [inputs / p.name for p in files], skipped


def case_files(inputs: Path) -> list[Path]:
    """The ``*.npz`` cases of a folder, sorted; InputError when there are none."""
    return scan_cases(inputs)[0]


def _announce(r: CaseResult, done: int = 0, total: int = 0, lines: bool = False) -> None:
    """The case's lines on stderr: one per failed case, one per note; with ``lines`` (no progress bar:
    stderr is no terminal) also one for a case that succeeded or was kept, with ``done``/``total``."""
    if r.status not in ("ok", "skipped"):
        print(f"{r.case}: {r.status}: {r.message}", file=sys.stderr, flush=True)
        return
    if r.message and r.status == "ok":
        print(f"{r.case}: note: {r.message}", file=sys.stderr, flush=True)
    if lines:
        what = f"ok, {r.boxes} boxes, {r.seconds:.1f} s" if r.status == "ok" else "kept from an earlier run"
        print(f"{r.case}: {what} ({done}/{total})", file=sys.stderr, flush=True)


def predict_folder(segmenter: Segmenter, files: list[Path], outputs: Path, *, default_modality: str | None = None,
                   overlays: Path | None = None, timing: Path | None = None, progress: bool | None = None,
                   max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, skip_existing: bool = False,
                   earlier: dict[str, CaseResult] | None = None) -> list[CaseResult]:
    """Segment ``files`` into ``outputs`` (same names, key ``segs``); returns one result per case.

    The timing CSV (default ``outputs/timing.csv``) is merged and rewritten atomically after every
    case, so it is complete up to the last finished case even if the run is killed. SIGTERM and
    SIGINT raise :class:`~mcp_medsam.io.atomic.Interrupted` after the last finished case is recorded.
    skip_existing: keep each output that stands (:func:`run_case`); earlier: rows of earlier runs by
    case, whose figures a skipped case's row keeps (default: those of the timing CSV).
    """
    if default_modality is not None:
        segmenter.modality_row(default_modality)  # checked once, before any case
    outputs.mkdir(parents=True, exist_ok=True)
    timing = timing if timing is not None else outputs / "timing.csv"
    if skip_existing and earlier is None:
        earlier = earlier_results(timing)
    earlier = earlier or {}
    show = sys.stderr.isatty() if progress is None else progress
    results: list[CaseResult] = []

    def record(r: CaseResult) -> None:
        results.append(r)
        write_timing(timing, results)

    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(files), file=sys.stderr, unit="case", dynamic_ncols=True)
    try:
        with stop_on_signals():
            for path in files:
                if bar is not None:
                    bar.set_postfix_str(path.name[:40])
                r = run_case(segmenter, path, outputs, default_modality=default_modality, overlays=overlays,
                             max_image_bytes=max_image_bytes, record=record, skip_existing=skip_existing,
                             earlier=earlier.get(path.name))
                _announce(r, len(results), len(files), lines=not show)
                if bar is not None:
                    bar.update(1)
    except Interrupted as exc:
        exc.finished = len(results)
        raise
    finally:
        if bar is not None:
            bar.close()
    return results


def predict_dask(dask: str, files: list[Path], outputs: Path, *, weights: Path | None = None,
                 backend: str = "openvino", threads: int | None = None, cache_dir: Path | None = None,
                 max_batch: int = 8, default_modality: str | None = None, overlays: Path | None = None,
                 timing: Path | None = None, progress: bool | None = None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, skip_existing: bool = False,
                 earlier: dict[str, CaseResult] | None = None) -> list[CaseResult]:
    """:func:`predict_folder` with each case a Dask task (:mod:`mcp_medsam.cluster`): ``dask`` is
    ``local:N`` or a scheduler address / scheduler file; the workers load the model (``weights``,
    ``backend``, ``threads``: default one per worker thread, ``cache_dir``: default the worker's own)
    and write the outputs; the rows are written here as they arrive (in the order cases finish)."""
    from .cluster import parse_dask, run_dask

    target = parse_dask(dask)
    outputs.mkdir(parents=True, exist_ok=True)
    timing = timing if timing is not None else outputs / "timing.csv"
    if skip_existing and earlier is None:
        earlier = earlier_results(timing)
    show = sys.stderr.isatty() if progress is None else progress
    results: list[CaseResult] = []

    def record(row: dict[str, Any]) -> None:
        r = CaseResult(**row)
        results.append(r)
        write_timing(timing, results)
        _announce(r, len(results), len(files), lines=not show)

    load = {"weights": str(Path(weights).resolve()) if weights is not None else None, "backend": backend,
            "threads": threads, "cache_dir": str(Path(cache_dir).resolve()) if cache_dir is not None else None,
            "max_batch": max_batch}
    options = {"default_modality": default_modality, "overlays": overlays, "max_image_bytes": max_image_bytes,
               "skip_existing": skip_existing}
    try:
        with stop_on_signals():
            run_dask(target, [p.resolve() for p in files], outputs.resolve(), load=load, options=options,
                     earlier=earlier or {}, record=record, progress=show, default_modality=default_modality)
    except Interrupted as exc:
        exc.finished = len(results)
        raise
    finally:
        for folder in {outputs, *([overlays] if overlays is not None else [])}:
            remove_stale_temps(folder)  # a worker killed mid-write leaves its temp file, no longer locked
    return results


def predict(inputs: Path, outputs: Path, *, weights: Path | None = None, backend: str = "openvino",
            overlays: Path | None = None, default_modality: str | None = None, timing: Path | None = None,
            max_batch: int = 8, threads: int | None = None, cache_dir: Path | None = None,
            max_image_mb: float = DEFAULT_MAX_IMAGE_BYTES / 2 ** 20, num_parts: int = 1,
            part_id: int | str | None = None, skip_existing: bool = False, dask: str | None = None
            ) -> list[CaseResult]:
    """``mcp-medsam predict``: check the folders, load the model, run every case of ``inputs``.

    Every problem with the folders is one InputError before the model loads (a bad ``num_parts`` /
    ``part_id`` / ``dask``: UsageError); stale temp files of this tool in the output folders are
    removed first. num_parts, part_id (a number or ``"auto"``): run part I of N of the sorted case
    list, rows to ``timing.part-I-of-N.csv``, merged into the timing CSV when every part's rows are
    in; skip_existing: keep finished outputs; dask: run the cases on a Dask cluster.
    """
    with stop_on_signals():  # also while the model loads: SIGINT then ends with one line, not a traceback
        return _predict(inputs, outputs, weights=weights, backend=backend, overlays=overlays,
                        default_modality=default_modality, timing=timing, max_batch=max_batch, threads=threads,
                        cache_dir=cache_dir, max_image_mb=max_image_mb, num_parts=num_parts, part_id=part_id,
                        skip_existing=skip_existing, dask=dask)


def _predict(inputs: Path, outputs: Path, *, weights: Path | None, backend: str, overlays: Path | None,
             default_modality: str | None, timing: Path | None, max_batch: int, threads: int | None,
             cache_dir: Path | None, max_image_mb: float, num_parts: int, part_id: int | str | None,
             skip_existing: bool, dask: str | None) -> list[CaseResult]:
    part = resolve_part(num_parts, part_id)
    if dask is not None:
        from .cluster import parse_dask

        parse_dask(dask)  # a malformed --dask is a usage error before anything else
    files, skipped = scan_cases(inputs)
    if max_image_mb <= 0:
        raise InputError(f"--max-image-mb {max_image_mb} must be positive")
    out_dir = check_output_dir(outputs, inputs=[inputs])
    overlay_dir = check_output_dir(overlays, inputs=[inputs], what="overlays folder") if overlays else None
    timing_file = check_output_file(timing if timing is not None else out_dir / "timing.csv", inputs=[inputs],
                                    what="timing file")
    part_file = part_timing_path(timing_file, part)
    for folder in {out_dir, timing_file.parent, *([overlay_dir] if overlay_dir else [])}:
        remove_stale_temps(folder)
    for note in skipped:
        print(f"note: {note}", file=sys.stderr, flush=True)
    mine = part.select(files, key=lambda p: p.name)
    earlier = earlier_results(timing_file, part_file) if skip_existing else {}
    common = dict(default_modality=default_modality, overlays=overlay_dir, timing=part_file,
                  max_image_bytes=int(max_image_mb * 2 ** 20), skip_existing=skip_existing, earlier=earlier)
    if not mine:
        print(f"note: {part} has no cases ({len(files)} in all)", file=sys.stderr, flush=True)
        write_timing(part_file, [])
        results: list[CaseResult] = []
    elif dask is not None:
        from .manifest import bundled_weights, load_manifest

        load_manifest(Path(weights) if weights is not None else bundled_weights())  # a bad folder: one line, here
        results = predict_dask(dask, mine, out_dir, weights=weights, backend=backend, threads=threads,
                               cache_dir=cache_dir, max_batch=max_batch, **common)
    else:
        segmenter = Segmenter.load(weights, backend=backend, threads=threads, cache_dir=cache_dir,
                                   max_batch=max_batch)
        results = predict_folder(segmenter, mine, out_dir, **common)
    if not part.whole:
        merged = merge_when_complete(timing_file, part, [p.name for p in files])
        if merged is not None:
            print(f"note: every part's rows are in: wrote {timing_file} ({merged.rows} cases, {part.num_parts} parts)",
                  file=sys.stderr, flush=True)
        else:
            how = (f"mcp-medsam timing merge {out_dir}" if timing_file == out_dir / "timing.csv" else
                   f"mcp-medsam timing merge --timing {timing_file}")
            print(f"note: {part} done; {timing_file.name} is written when the last part finishes (or: {how})",
                  file=sys.stderr, flush=True)
    return results


def summary(results: Sequence[Any], wall_seconds: float, what: str = "cases") -> str:
    """The closing line of a run (``results``: anything with a ``status``: ok, skipped, failed, error):
    ``N cases: K segmented, S kept from an earlier run, F failed in T s wall time``. The wall time is
    the run's own (parts of a cluster run overlap, so per-case seconds would add up to more)."""
    segmented = sum(r.status == "ok" for r in results)
    kept = sum(r.status == "skipped" for r in results)
    failed = len(results) - segmented - kept
    return (f"{len(results)} {what}: {segmented} segmented, {kept} kept from an earlier run, {failed} failed "
            f"in {wall_seconds:.1f} s wall time")
