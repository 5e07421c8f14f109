"""The folder runner behind ``mcp-medsam predict``: CVPR24 NPZ cases in, ``segs`` NPZ files out.

Built on :class:`~mcp_medsam.segmenter.Segmenter`: per case it reads the file, takes the modality
from the file name (the official rule), calls ``segment_image`` / ``segment_volume``, and writes the
result atomically. One bad case gets one line and a "failed" row in the timing CSV; the others run.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, SegmentationError, UnknownModality
from .io.atomic import write_npz, write_text
from .io.npz import Case, load_case
from .modality import modality_token
from .prompts import covered_slices
from .segmenter import Segmenter


@dataclass
class CaseResult:
    case: str
    seconds: float = 0.0
    boxes: int = 0
    slices: int = 0  # distinct slices segmented (1 for a 2D image)
    status: str = "ok"
    message: str = ""
    gflops: float = 0.0
    graph_seconds: float = 0.0  # inside graph calls; the rest is reading, pre/post-processing, writing


TIMING_FIELDS = ("case", "seconds", "boxes", "slices", "status", "message")


def timing_csv(results: list[CaseResult]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(TIMING_FIELDS)
    for r in results:
        wr.writerow([r.case, f"{r.seconds:.3f}", r.boxes, r.slices, r.status, r.message])
    return buf.getvalue()


def case_modality(segmenter: Segmenter, name: str, default: str | None) -> str:
    """The modality of a case file: the token after ``2DBox_``/``3DBox_`` (aliases as the official
    pipeline), else ``default`` (already checked by the caller), else UnknownModality."""
    token = modality_token(name)
    if token in segmenter.modalities:
        return token
    if default is not None:
        return default
    raise UnknownModality(f"unknown modality {token!r} in the file name; accepted: "
                          f"{', '.join(segmenter.modalities)} (or pass --default-modality)")


def segment_case(segmenter: Segmenter, case: Case, modality: str) -> np.ndarray:
    """(H, W) or (D, H, W) labels of one loaded case."""
    if case.is_3d:
        return segmenter.segment_volume(case.image, case.boxes, modality)
    return segmenter.segment_image(case.image, case.boxes, modality)


def run_case(segmenter: Segmenter, path: Path, out_dir: Path, *, default_modality: str | None = None,
             overlays: Path | None = None) -> CaseResult:
    """Load, segment and write one case; never raises for a problem with the case itself."""
    t0 = time.perf_counter()
    stats, manifest = segmenter.engine.stats, segmenter.manifest
    flops0, graph0 = stats.gflops(manifest), sum(stats.seconds.values())
    try:
        case = load_case(path)
        segs = segment_case(segmenter, case, case_modality(segmenter, path.name, default_modality))
        write_npz(out_dir / path.name, segs=segs)
        if overlays is not None:
            from .overlay import write_overlay

            write_overlay(overlays / f"{path.stem}.png", case, segs)
        result = CaseResult(case=path.name, boxes=len(case.boxes),
                            slices=covered_slices(case.boxes) if case.is_3d else 1)
    except SegmentationError as exc:
        result = CaseResult(case=path.name, status="failed", message=str(exc))
    except MemoryError:
        result = CaseResult(case=path.name, status="failed", message="out of memory")
    except Exception as exc:  # an internal error must not take the other cases down
        result = CaseResult(case=path.name, status="error", message=f"{exc.__class__.__name__}: {exc}")
    result.seconds = time.perf_counter() - t0
    result.gflops = stats.gflops(manifest) - flops0
    result.graph_seconds = sum(stats.seconds.values()) - graph0
    return result


def case_files(inputs: Path) -> list[Path]:
    """The ``*.npz`` cases of a folder, sorted; InputError when there are none."""
    if not inputs.is_dir():
        raise InputError(f"input folder {inputs} does not exist")
    files = sorted(p for p in inputs.glob("*.npz") if p.is_file())
    if not files:
        raise InputError(f"no .npz cases in {inputs}")
    return files


def predict_folder(segmenter: Segmenter, files: list[Path], outputs: Path, *, default_modality: str | None = None,
                   overlays: Path | None = None, timing: Path | None = None,
                   progress: bool | None = None) -> list[CaseResult]:
    """Segment ``files`` into ``outputs`` (same names, key ``segs``); returns one result per case.

    The timing CSV (default ``outputs/timing.csv``) is rewritten atomically after every case, so it
    is complete up to the last finished case even if the run is killed.
    """
    if default_modality is not None:
        segmenter.modality_row(default_modality)  # checked once, before any case
    outputs.mkdir(parents=True, exist_ok=True)
    timing = timing if timing is not None else outputs / "timing.csv"
    show = sys.stderr.isatty() if progress is None else progress
    results: list[CaseResult] = []
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(files), file=sys.stderr, unit="case", dynamic_ncols=True)
    for path in files:
        if bar is not None:
            bar.set_postfix_str(path.name[:40])
        r = run_case(segmenter, path, outputs, default_modality=default_modality, overlays=overlays)
        results.append(r)
        if r.status != "ok":
            print(f"{r.case}: {r.status}: {r.message}", file=sys.stderr, flush=True)
        write_text(timing, timing_csv(results))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def predict(inputs: Path, outputs: Path, *, weights: Path | None = None, backend: str = "openvino",
            overlays: Path | None = None, default_modality: str | None = None, timing: Path | None = None,
            max_batch: int = 8, threads: int | None = None, cache_dir: Path | None = None) -> list[CaseResult]:
    """``mcp-medsam predict``: check the folders, load the model, run every case of ``inputs``."""
    files = case_files(inputs)
    segmenter = Segmenter.load(weights, backend=backend, threads=threads, cache_dir=cache_dir, max_batch=max_batch)
    return predict_folder(segmenter, files, outputs, default_modality=default_modality, overlays=overlays,
                          timing=timing)
