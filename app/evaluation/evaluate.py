"""Score a folder of segmentations against the challenge ground truth (``mcp-medsam evaluate``).

For every ``gts/<name>.npz`` (key ``gts``; 3D files also carry ``spacing`` (z, y, x) in mm) the
prediction is ``segs/<name>.npz`` (key ``segs``). A missing, unreadable or wrongly shaped
prediction scores DSC 0 / NSD 0 and is listed as a problem. Cases are grouped by modality (the
file-name token, canonicalised: ``Mammo`` -> ``Mammography``); the overall score is the mean of
the per-modality means, as the MCP-MedSAM paper reports it, with the standard deviation across
modalities (population, ddof=0).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import write_text
from .metrics import case_scores
from ..modality import CATEGORIES, UnknownModality, canonical, modality_token

CSV_FIELDS = ("case", "modality", "dsc", "nsd", "status")


class EvaluationError(ValueError):
    """The folders cannot be evaluated at all (no gts, no segs folder)."""


@dataclass(frozen=True)
class CaseRow:
    case: str  # file name, e.g. 3DBox_CT_STS_STS-001.npz
    modality: str
    dsc: float  # 0..1
    nsd: float  # 0..1
    status: str  # ok | missing | unreadable | misshaped


@dataclass(frozen=True)
class ModalityRow:
    modality: str
    n: int
    dsc: float  # mean over the modality's cases, 0..1
    nsd: float


@dataclass(frozen=True)
class TimingRow:
    """Seconds per case of one modality, from the timing CSV that ``predict`` writes."""
    modality: str
    n: int  # cases with status "ok" and a numeric time; the statistics are over these
    mean_s: float  # NaN when n == 0
    median_s: float
    max_s: float
    total_s: float
    failed: int  # rows whose status is not "ok"


@dataclass
class EvaluationResult:
    cases: list[CaseRow]
    modalities: list[ModalityRow]
    dsc: float  # mean of the modality means (NaN without cases)
    nsd: float
    dsc_std: float  # standard deviation of the modality means
    nsd_std: float
    problems: list[str]
    tolerance: float
    nsd_dsc_gate: bool
    timing: list[TimingRow] = field(default_factory=list)
    unpredicted: list[str] = field(default_factory=list)  # ground-truth cases without a prediction file
    only_predicted: bool = False  # those were left out (else each is a case scored 0)

    @property
    def case_mean_dsc(self) -> float:
        """Mean over cases (what the challenge script's CSV averages to), not over modalities."""
        return _mean([c.dsc for c in self.cases])

    @property
    def case_mean_nsd(self) -> float:
        return _mean([c.nsd for c in self.cases])


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def case_modality(name: str) -> str:
    """Canonical modality of a case file name; an unknown token is kept as it is."""
    token = modality_token(name)
    try:
        return canonical(token)
    except UnknownModality:
        return token


def _modality_order(modality: str) -> tuple[int, str]:
    # The official category order first (CT, MR, ...), unknown tokens after it alphabetically.
    return (CATEGORIES.index(modality) if modality in CATEGORIES else len(CATEGORIES), modality)


def _load_array(path: Path, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(array under ``key``, ``spacing`` or None); raises on unreadable files or missing keys."""
    with np.load(path, allow_pickle=False) as z:
        arr = z[key]
        spacing = np.asarray(z["spacing"], dtype=np.float64) if "spacing" in z.files else None
    return arr, spacing


def _score_case(gt_path: Path, seg_path: Path, modality: str, tolerance: float, nsd_dsc_gate: bool,
                problems: list[str]) -> CaseRow | None:
    name = gt_path.name
    try:
        gt, spacing = _load_array(gt_path, "gts")
    except Exception as exc:  # a broken gt cannot be scored at all: report it, keep going
        problems.append(f"gt unreadable: {name} ({exc.__class__.__name__}: {exc})")
        return None
    if gt.ndim not in (2, 3):
        problems.append(f"gt not 2D/3D: {name} (shape {gt.shape})")
        return None
    if not seg_path.is_file():
        problems.append(f"missing: {name}")
        return CaseRow(name, modality, 0.0, 0.0, "missing")
    try:
        seg, _ = _load_array(seg_path, "segs")
    except Exception as exc:
        problems.append(f"unreadable: {name} ({exc.__class__.__name__}: {exc})")
        return CaseRow(name, modality, 0.0, 0.0, "unreadable")
    if seg.shape != gt.shape:
        problems.append(f"misshaped: {name} (segs {seg.shape}, gts {gt.shape})")
        return CaseRow(name, modality, 0.0, 0.0, "misshaped")
    if gt.ndim == 3:
        if spacing is None or spacing.shape != (3,):
            problems.append(f"no spacing: {name} (1 mm assumed)")
            spacing = None
    else:
        spacing = None  # the challenge scores 2D cases at unit spacing whatever the file says
    dsc, nsd, _ = case_scores(gt, seg, None if spacing is None else tuple(spacing), tolerance=tolerance,
                              nsd_dsc_gate=nsd_dsc_gate)
    return CaseRow(name, modality, dsc, nsd, "ok")


def read_timing(path: Path) -> list[TimingRow]:
    """Per-modality seconds per case from a ``predict`` timing CSV
    (columns case, seconds, boxes, slices, status, message). Rows without a numeric time are left
    out; rows whose status is not ``ok`` are counted as failed, not timed."""
    per: dict[str, list[tuple[float, str]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                seconds = float(row["seconds"])
            except (KeyError, TypeError, ValueError):
                continue
            per.setdefault(case_modality(row.get("case") or ""), []).append((seconds, row.get("status") or ""))
    rows = []
    for modality in sorted(per, key=_modality_order):
        # A failed case's time says how long it took to fail, not how fast the model is.
        secs = [s for s, st in per[modality] if st == "ok"]
        failed = len(per[modality]) - len(secs)
        if secs:
            rows.append(TimingRow(modality, len(secs), float(np.mean(secs)), float(statistics.median(secs)),
                                  max(secs), float(sum(secs)), failed))
        else:
            rows.append(TimingRow(modality, 0, math.nan, math.nan, math.nan, 0.0, failed))
    return rows


def cases_csv(cases: list[CaseRow]) -> str:
    """The per-case CSV text: case, modality, dsc, nsd, status (scores 0..1, 6 decimals)."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CSV_FIELDS)
    for c in cases:
        wr.writerow([c.case, c.modality, f"{c.dsc:.6f}", f"{c.nsd:.6f}", c.status])
    return buf.getvalue()


def evaluate_folder(segs: Path, gts: Path, *, csv_path: Path | None = None, report_dir: Path | None = None,
                    timing_csv: Path | None = None, tolerance: float = 2.0,
                    nsd_dsc_gate: bool = True, only_predicted: bool = False) -> EvaluationResult:
    """Score every ``gts/*.npz`` against ``segs/<same name>`` (see the module docstring).

    ``csv_path``: write the per-case CSV there (atomically). ``report_dir``: write the PNG charts
    and the HTML summary there (:func:`mcp_medsam.evaluation.report.write_report`). ``timing_csv``: the timing CSV of
    ``predict``, summarised per modality in the result, the table and the report.
    ``only_predicted``: score only the ground-truth cases that have a prediction file (a run over part of
    the cases); the others are counted in ``unpredicted`` either way.
    Raises EvaluationError when ``gts`` holds no ``*.npz`` or ``segs`` is not a folder (or, with
    ``only_predicted``, holds no prediction of a ground-truth case).
    """
    segs, gts = Path(segs), Path(gts)
    write_report = None
    if report_dir is not None:
        try:  # matplotlib only when a report is asked for; missing, it fails before any case is scored
            from .report import write_report
        except ImportError as exc:
            raise EvaluationError(f"the report needs {exc.name}: pip install 'mcp-medsam[eval]'") from None
    gt_files = sorted(gts.glob("*.npz")) if gts.is_dir() else []
    if not gt_files:
        raise EvaluationError(f"no ground truth *.npz in {gts}")
    if not segs.is_dir():
        raise EvaluationError(f"segmentation folder not found: {segs}")

    unpredicted = [p.name for p in gt_files if not (segs / p.name).exists()]
    if only_predicted:
        gt_files = [p for p in gt_files if p.name not in set(unpredicted)]
        if not gt_files:
            raise EvaluationError(f"no prediction in {segs} is named like a ground-truth case of {gts}")
    problems: list[str] = []
    cases = []
    for gt_path in gt_files:
        row = _score_case(gt_path, segs / gt_path.name, case_modality(gt_path.name), tolerance, nsd_dsc_gate,
                          problems)
        if row is not None:
            cases.append(row)
    gt_names = {p.name for p in gt_files} | set(unpredicted)
    problems += [f"no gt for prediction: {p.name}" for p in sorted(segs.glob("*.npz")) if p.name not in gt_names]

    by_modality: dict[str, list[CaseRow]] = {}
    for c in cases:
        by_modality.setdefault(c.modality, []).append(c)
    modalities = [ModalityRow(m, len(rows), _mean([r.dsc for r in rows]), _mean([r.nsd for r in rows]))
                  for m, rows in sorted(by_modality.items(), key=lambda kv: _modality_order(kv[0]))]
    mod_dsc = [m.dsc for m in modalities]
    mod_nsd = [m.nsd for m in modalities]

    timing: list[TimingRow] = []
    if timing_csv is not None:
        try:
            timing = read_timing(Path(timing_csv))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            problems.append(f"timing CSV unreadable: {timing_csv} ({exc})")

    result = EvaluationResult(
        cases=cases, modalities=modalities,
        dsc=_mean(mod_dsc), nsd=_mean(mod_nsd),
        dsc_std=float(np.std(mod_dsc)) if mod_dsc else math.nan,
        nsd_std=float(np.std(mod_nsd)) if mod_nsd else math.nan,
        problems=problems, tolerance=tolerance, nsd_dsc_gate=nsd_dsc_gate, timing=timing,
        unpredicted=unpredicted, only_predicted=only_predicted,
    )
    if csv_path is not None:
        write_text(csv_path, cases_csv(cases))
    if write_report is not None:
        write_report(result, report_dir)
    return result


def format_table(result: EvaluationResult) -> str:
    """The text the CLI prints: per-modality DSC/NSD (%) and n, the overall row, the problems,
    then the timing summary when there is one."""
    gate = "NSD counted as 0 where the case DSC <= 0.2" if result.nsd_dsc_gate else "no DSC gate on NSD"
    lines = [f"NSD tolerance {result.tolerance:g} mm; {gate}; scores in %", "",
             f"{'modality':<14}{'n':>5}{'DSC':>9}{'NSD':>9}"]
    for m in result.modalities:
        lines.append(f"{m.modality:<14}{m.n:>5}{100 * m.dsc:>9.2f}{100 * m.nsd:>9.2f}")
    lines.append("-" * 37)
    n_mod = len(result.modalities)
    lines.append(f"{'overall':<14}{len(result.cases):>5}{100 * result.dsc:>9.2f}{100 * result.nsd:>9.2f}"
                 f"   mean of {n_mod} modality means")
    lines.append(f"{'  std':<14}{'':>5}{100 * result.dsc_std:>9.2f}{100 * result.nsd_std:>9.2f}"
                 f"   across modalities")
    lines.append(f"{'case mean':<14}{len(result.cases):>5}{100 * result.case_mean_dsc:>9.2f}"
                 f"{100 * result.case_mean_nsd:>9.2f}")
    not_ok = [c for c in result.cases if c.status != "ok"]
    lines += ["", f"problems: {len(result.problems)} ({len(not_ok)} predictions scored 0)"
              if result.problems else "problems: none"]
    lines += [f"  {p}" for p in result.problems]
    n_gt = len(result.cases) + (len(result.unpredicted) if result.only_predicted else 0)
    lines.append(f"ground-truth cases without a prediction: {len(result.unpredicted)} of {n_gt}"
                 + ("" if not result.unpredicted else " (left out: --only-predicted)" if result.only_predicted
                    else " (each scored 0; --only-predicted leaves them out)"))
    if result.timing:
        lines += ["", "seconds per case (predict timing)",
                  f"{'modality':<14}{'n':>5}{'mean':>9}{'median':>9}{'max':>9}{'total':>10}{'failed':>8}"]
        lines += [f"{t.modality:<14}{t.n:>5}{t.mean_s:>9.2f}{t.median_s:>9.2f}{t.max_s:>9.2f}{t.total_s:>10.1f}"
                  f"{t.failed:>8}" for t in result.timing]
    return "\n".join(lines) + "\n"
