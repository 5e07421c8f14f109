"""``mcp-medsam evaluate-interactive``: the CVPR 2025 interactive protocol on a folder of cases.

As ``CVPR25_iter_eval.py`` (JunMa11/CVPR-MedSegFMCompetition) per case: a box round, then
``rounds`` click rounds; before each click round the simulated user adds, per ground-truth class,
one click by the challenge's rule (:mod:`mcp_medsam.interactive.clicks`) on the previous round's
segs, and the case is segmented with its boxes and every click so far. Scores per round: the
challenge's DSC and NSD (:func:`mcp_medsam.evaluation.metrics.case_scores`; NSD 0 when DSC <= 0.2).
DSC AUC / NSD AUC: the trapezoid over the click rounds (the box round left out, x spacing 1, as the
challenge's ``cumulative_trapezoid(dscs[-5:], np.arange(5))[-1]``: 0..4 for 5 rounds); final: the
last round. The challenge's budget: 90 s per class for all rounds of a case.

Two ways to run the rounds:

- in one process (default): the model loads once and each case's image embeddings are kept
  between its rounds (a 2D image is encoded once; a volume's slices stay in a cache), seconds per
  round are the segmentation's own;
- ``per_round_process``: one ``mcp-medsam predict`` process per round on a one-case folder whose
  file gets ``clicks``, ``clicks_order`` and ``prev_pred`` as the challenge writes them (what the
  challenge times: process start, model load, the case); seconds per round are the process's.

Clicks for target i (the i-th gt class, sorted) go to the box labelled i + 1 (the challenge's
boxes come from sequentially relabelled gts, so class i + 1 is target i).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..batch import case_modality, scan_cases
from ..errors import InputError
from ..interactive.clicks import challenge_classes, click_round
from ..io.atomic import write_text
from ..io.npz import Case, click_prompts, load_case
from ..segmenter import Segmenter
from .evaluate import _load_array
from .metrics import case_scores

BUDGET_PER_CLASS = 90.0  # seconds for all rounds of a case, per class (the challenge's limit)


@dataclass
class CaseRounds:
    """One case's rounds: index 0 is the box round, 1..N the click rounds."""

    case: str
    modality: str
    classes: int
    dsc: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    clicks: list[int] = field(default_factory=list)  # clicks given in each round (all classes)
    status: str = "ok"
    message: str = ""

    @property
    def dsc_auc(self) -> float:
        return auc(self.dsc[1:])

    @property
    def nsd_auc(self) -> float:
        return auc(self.nsd[1:])

    @property
    def over_budget(self) -> bool:
        return sum(self.seconds) > BUDGET_PER_CLASS * max(self.classes, 1)


def auc(values: list[float]) -> float:
    """Trapezoid over consecutive rounds (x spacing 1); NaN with fewer than two values."""
    if len(values) < 2:
        return math.nan
    return float(sum((a + b) / 2 for a, b in zip(values, values[1:])))


@dataclass
class InteractiveResult:
    cases: list[CaseRounds]
    rounds: int
    mode: str
    files: list[Path] = field(default_factory=list)

    def ok(self) -> list[CaseRounds]:
        return [c for c in self.cases if c.status == "ok"]


def _targets(case: Case, classes: list[int]) -> dict[int, int]:
    """Target index (the i-th gt class) -> box row, as the NPZ reader maps clicks: target i is label i + 1."""
    labels = case.labels if case.labels is not None else np.arange(1, len(case.boxes) + 1)
    row = {int(lab): j for j, lab in enumerate(labels)}
    return {i: row[i + 1] for i in range(len(classes)) if i + 1 in row}


def _dims(case: Case) -> tuple[int, ...]:
    return (case.shape[2], case.shape[1], case.shape[0]) if case.is_3d else (case.shape[1], case.shape[0])


def _score(gt: np.ndarray, segs: np.ndarray, spacing: np.ndarray | None, tolerance: float) -> tuple[float, float]:
    sp = tuple(spacing) if gt.ndim == 3 and spacing is not None and np.shape(spacing) == (3,) else None
    dsc, nsd, _ = case_scores(gt, segs, sp, tolerance=tolerance)
    return dsc, nsd


def _gt(gts: Path, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    path = gts / name
    if not path.is_file():
        raise InputError(f"no ground truth {path}")
    try:
        gt, spacing = _load_array(path, "gts")
    except Exception as exc:  # an unreadable gt: this case cannot be scored
        raise InputError(f"ground truth {path.name} unreadable ({exc.__class__.__name__}: {exc})") from None
    if gt.shape != tuple(shape):
        raise InputError(f"ground truth {path.name} has shape {gt.shape}; the case's image is {tuple(shape)}")
    return gt, spacing


# ---------------------------------------------------------------- one process, embeddings kept


def _rounds_in_process(seg: Segmenter, path: Path, gts: Path, rounds: int, default_modality: str | None,
                       tolerance: float) -> CaseRounds:
    case = load_case(path)
    modality = case_modality(seg, path.name, default_modality)
    gt, spacing = _gt(gts, path.name, case.shape)
    if case.is_3d and spacing is None:
        with np.load(path, allow_pickle=False) as z:  # the CVPR25 cases carry spacing in the image file
            spacing = np.asarray(z["spacing"], np.float64) if "spacing" in z.files else None
    classes = challenge_classes(gt)
    out = CaseRounds(case=path.name, modality=modality, classes=len(classes))
    targets = _targets(case, classes)
    cache = seg.slice_cache(seg.cache_slices) if case.is_3d else None
    emb = None
    clicks: list[dict] = []
    order: list[list] = []
    segs = None
    for r in range(rounds + 1):
        if r:
            new = click_round(segs, gt, clicks, order)
            out.clicks.append(sum(c is not None for c in new))
            case.points, case.point_labels, _ = click_prompts(clicks, order, len(classes), targets, _dims(case))
            case.prev = segs
        else:
            out.clicks.append(0)
        t = time.perf_counter()
        if case.is_3d and r:
            raw = seg.refine_volume(case.image, case.boxes, modality, points=case.points,
                                    point_labels=case.point_labels, prev=case.prev_by_box(), cache=cache,
                                    starts=case.starts)
        elif case.is_3d:
            raw = seg.segment_volume(case.image, case.boxes, modality, cache=cache, starts=case.starts)
        else:
            emb = emb if emb is not None else seg.embed(case.image)
            raw = seg.segment_embedding(emb, case.boxes, modality, points=case.points if r else None,
                                        point_labels=case.point_labels if r else None)[0]
        segs = case.relabel(raw)
        out.seconds.append(time.perf_counter() - t)
        dsc, nsd = _score(gt, segs, spacing, tolerance)
        out.dsc.append(dsc)
        out.nsd.append(nsd)
    return out


# ---------------------------------------------------------------- one predict process per round


def _rewrite(src: Path, dst: Path, extra: dict[str, object]) -> None:
    """``dst``: the members of ``src`` copied as they are (nothing unpickled) but those in ``extra``,
    which are written as np.savez writes them (object arrays pickled, as the challenge's file)."""
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.removesuffix(".npy") not in extra:
                zout.writestr(info, zin.read(info))
        for key, value in extra.items():
            arr = np.asanyarray(value) if not isinstance(value, list) else np.array(value, dtype=object)
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=True)
            zout.writestr(key + ".npy", buf.getvalue())
    tmp.replace(dst)


def _rounds_per_process(path: Path, gts: Path, rounds: int, tolerance: float, predict_args: list[str],
                        work: Path) -> CaseRounds:
    from ..modality import modality_token

    case = load_case(path)  # checked here once; the rounds' processes read it again, as the challenge runs them
    gt, spacing = _gt(gts, path.name, case.shape)
    if case.is_3d and spacing is None:
        with np.load(path, allow_pickle=False) as z:
            spacing = np.asarray(z["spacing"], np.float64) if "spacing" in z.files else None
    classes = challenge_classes(gt)
    out = CaseRounds(case=path.name, modality=modality_token(path.name), classes=len(classes))
    ins, outs = work / "inputs", work / "outputs"
    shutil.rmtree(work, ignore_errors=True)
    ins.mkdir(parents=True)
    shutil.copy(path, ins / path.name)
    clicks: list[dict] = []
    order: list[list] = []
    segs = None
    for r in range(rounds + 1):
        if r:
            new = click_round(segs, gt, clicks, order)
            out.clicks.append(sum(c is not None for c in new))
            _rewrite(path, ins / path.name, {"clicks": [dict(c) for c in clicks], "clicks_order": list(order),
                                             "prev_pred": segs.astype(np.uint8 if segs.max(initial=0) < 256
                                                                      else np.uint16)})
        else:
            out.clicks.append(0)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mcp_medsam", "predict", "-i", str(ins), "-o", str(outs),
                               *predict_args], capture_output=True, text=True)
        out.seconds.append(time.perf_counter() - t)
        result = outs / path.name
        if proc.returncode == 0 and result.is_file():
            segs, _ = _load_array(result, "segs")
        else:  # as the challenge: a round without a result scores an empty prediction
            segs = np.zeros(gt.shape, np.uint8)
            out.message = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        dsc, nsd = _score(gt, segs, spacing, tolerance)
        out.dsc.append(dsc)
        out.nsd.append(nsd)
    return out


# ---------------------------------------------------------------- the folder


def evaluate_interactive(inputs: Path, gts: Path, out_dir: Path, *, weights: Path | None = None, rounds: int = 5,
                         per_round_process: bool = False, threads: int | None = None,
                         default_modality: str | None = None, tolerance: float = 2.0,
                         log: bool = True) -> InteractiveResult:
    """Box round + ``rounds`` click rounds on every case of ``inputs`` against ``gts`` (same names, key
    ``gts``); writes ``interactive.csv`` (one row per case and round), ``interactive.json`` (the
    summary) and ``dsc_per_click.png`` into ``out_dir``. A case that cannot run gets status
    ``failed`` and its message; the others run."""
    if rounds < 1:
        raise InputError(f"--rounds {rounds} must be at least 1")
    files, _ = scan_cases(inputs)
    if not gts.is_dir():
        raise InputError(f"ground-truth folder {gts} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    seg = None
    predict_args: list[str] = []
    if per_round_process:
        if weights is not None:
            predict_args += ["--weights", str(Path(weights).resolve())]
        if threads is not None:
            predict_args += ["--threads", str(threads)]
        if default_modality is not None:
            predict_args += ["--default-modality", default_modality]
    else:
        seg = Segmenter.load(weights, threads=threads)
        if not seg.supports_points:
            raise InputError(f"the model in {seg.manifest.folder} takes box prompts only: no click rounds to evaluate")
    results = []
    with tempfile.TemporaryDirectory(prefix="mcp-medsam-rounds-") as tmp:
        for path in files:
            try:
                if seg is None:
                    row = _rounds_per_process(path, gts, rounds, tolerance, predict_args, Path(tmp) / "case")
                else:
                    row = _rounds_in_process(seg, path, gts, rounds, default_modality, tolerance)
            except InputError as exc:
                row = CaseRounds(case=path.name, modality="", classes=0, status="failed", message=str(exc))
            results.append(row)
            if log:
                print(_case_line(row, rounds), file=sys.stderr, flush=True)
    result = InteractiveResult(cases=results, rounds=rounds,
                               mode="one predict process per round" if per_round_process else "one process")
    result.files = _write(result, out_dir)
    return result


def _case_line(c: CaseRounds, rounds: int) -> str:
    if c.status != "ok":
        return f"{c.case}: {c.status}: {c.message}"
    return (f"{c.case}: DSC {' '.join(f'{v:.3f}' for v in c.dsc)}  DSC AUC {c.dsc_auc:.3f}  "
            f"{sum(c.seconds):.1f} s" + ("  OVER the 90 s/class budget" if c.over_budget else ""))


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def summary(result: InteractiveResult) -> dict:
    """Means over the cases that ran, overall and per modality: DSC/NSD/seconds per round, AUCs, finals."""
    def block(cases: list[CaseRounds]) -> dict:
        n = result.rounds + 1
        return {"cases": len(cases),
                "dsc": [_mean([c.dsc[r] for c in cases]) for r in range(n)],
                "nsd": [_mean([c.nsd[r] for c in cases]) for r in range(n)],
                "seconds": [_mean([c.seconds[r] for c in cases]) for r in range(n)],
                "dsc_auc": _mean([c.dsc_auc for c in cases]), "nsd_auc": _mean([c.nsd_auc for c in cases]),
                "final_dsc": _mean([c.dsc[-1] for c in cases]), "final_nsd": _mean([c.nsd[-1] for c in cases]),
                "over_budget": [c.case for c in cases if c.over_budget]}
    ok = result.ok()
    modalities = sorted({c.modality for c in ok})
    return {"mode": result.mode, "rounds": result.rounds, "overall": block(ok),
            "modalities": {m: block([c for c in ok if c.modality == m]) for m in modalities},
            "failed": {c.case: c.message for c in result.cases if c.status != "ok"}}


def _write(result: InteractiveResult, out_dir: Path) -> list[Path]:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["case", "modality", "classes", "round", "clicks", "dsc", "nsd", "seconds", "status", "message"])
    for c in result.cases:
        if c.status != "ok":
            wr.writerow([c.case, c.modality, c.classes, "", "", "", "", "", c.status, c.message])
            continue
        for r in range(len(c.dsc)):
            wr.writerow([c.case, c.modality, c.classes, r, c.clicks[r], f"{c.dsc[r]:.4f}", f"{c.nsd[r]:.4f}",
                         f"{c.seconds[r]:.3f}", c.status, c.message])
    files = [out_dir / "interactive.csv", out_dir / "interactive.json"]
    write_text(files[0], buf.getvalue())
    data = summary(result)
    data["cases"] = [{**asdict(c), "dsc_auc": c.dsc_auc, "nsd_auc": c.nsd_auc} for c in result.cases]
    write_text(files[1], json.dumps(data, indent=1, allow_nan=True) + "\n")
    if result.ok():
        files.append(_plot(data, out_dir / "dsc_per_click.png"))
    return files


def _plot(data: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .report import DPI, _write_png

    fig = Figure(figsize=(6.4, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(data["rounds"] + 1))
    for name, block in [*data["modalities"].items(), ("all", data["overall"])]:
        ax.plot(xs, block["dsc"], marker="o", label=f"{name} (n={block['cases']})",
                **({"color": "black", "linewidth": 2.5} if name == "all" else {}))
    ax.set_xticks(xs, ["box"] + [str(r) for r in xs[1:]])
    ax.set_xlabel("clicks per class")
    ax.set_ylabel("mean DSC")
    ax.set_ylim(0, 1)
    ax.grid(color="0.9")
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(f"DSC per click round ({data['mode']})", fontsize=11, fontweight="bold")
    _write_png(path, fig)
    return path


def format_table(result: InteractiveResult) -> str:
    """The printed summary: per round and per modality DSC/NSD, AUCs, finals, seconds per round, budget."""
    data = summary(result)
    n = result.rounds + 1
    heads = ["box"] + [f"click {r}" for r in range(1, n)]
    lines = [f"{len(result.ok())}/{len(result.cases)} cases, box + {result.rounds} click rounds ({result.mode})", ""]
    lines.append(f"{'':<22}" + "".join(f"{h:>9}" for h in heads) + f"{'DSC AUC':>9}{'NSD AUC':>9}{'final':>7}")
    for name, block in [*data["modalities"].items(), ("all", data["overall"])]:
        label = f"{name} (n={block['cases']})"
        lines.append(f"{label + ' DSC':<22}" + "".join(f"{v:>9.4f}" for v in block["dsc"])
                     + f"{block['dsc_auc']:>9.4f}{'':>9}{block['final_dsc']:>7.4f}")
        lines.append(f"{label + ' NSD':<22}" + "".join(f"{v:>9.4f}" for v in block["nsd"])
                     + f"{'':>9}{block['nsd_auc']:>9.4f}{block['final_nsd']:>7.4f}")
    lines.append(f"{'seconds per round':<22}" + "".join(f"{v:>9.2f}" for v in data["overall"]["seconds"]))
    over = data["overall"]["over_budget"]
    lines.append("")
    lines.append(f"90 s per class budget: {'exceeded by ' + ', '.join(over) if over else 'kept by every case'}")
    for case, message in data["failed"].items():
        lines.append(f"failed: {case}: {message}")
    return "\n".join(lines) + "\n"
