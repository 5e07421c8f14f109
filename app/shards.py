"""Deterministic parts of a case list (job arrays) and the resume check of finished outputs.

A run over an archive is split like nnU-Net's ``-num_parts N -part_id I``: part I of N takes every
N-th case of the *sorted* list, starting at the I-th (round robin, so each part gets its share of
2D and 3D cases, and the parts differ in size by one case at most). For any N every case is in
exactly one part, whichever machine lists the folder, as long as the parts see the same files.
``--part-id auto`` reads the index a scheduler gives each task: ``$SLURM_ARRAY_TASK_ID`` (less
``$SLURM_ARRAY_TASK_MIN``, so an array ``--array=1-4`` works too), else ``$JOB_COMPLETION_INDEX``
(a Kubernetes Indexed Job).

Resume (``--skip-existing``): a case is skipped when its output exists and reads back whole with
the shape (and dtype) the case gives; a truncated, unreadable or wrong-shaped output is redone.

Each part's timing rows go to ``timing.part-I-of-N.csv`` beside the timing file; merging them is
:func:`mcp_medsam.batch.merge_timing`.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np

from .errors import InputError, UsageError

T = TypeVar("T")

# Where a scheduler puts a task's index: SLURM job arrays, Kubernetes Indexed Jobs.
PART_ID_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")


@dataclass(frozen=True)
class Part:
    """Part ``part_id`` (0-based) of ``num_parts``; ``Part(1, 0)`` is the whole list."""

    num_parts: int = 1
    part_id: int = 0

    @property
    def whole(self) -> bool:
        return self.num_parts == 1

    def select(self, items: Sequence[T], key: Callable[[T], str] = str) -> list[T]:
        """This part's items, in their given order: every ``num_parts``-th of the list sorted by
        ``key``, from the ``part_id``-th on."""
        order = sorted(range(len(items)), key=lambda i: key(items[i]))
        chosen = set(order[self.part_id::self.num_parts])
        return [item for i, item in enumerate(items) if i in chosen]

    def __str__(self) -> str:
        return f"part {self.part_id} of {self.num_parts}"


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a whole number") from None


def resolve_part(num_parts: int = 1, part_id: int | str | None = None, *,
                 env: Mapping[str, str] | None = None) -> Part:
    """The :class:`Part` of ``--num-parts N --part-id I`` (I a number or ``auto``); UsageError otherwise.

    ``auto``: ``$SLURM_ARRAY_TASK_ID`` minus ``$SLURM_ARRAY_TASK_MIN`` (0 when unset), else
    ``$JOB_COMPLETION_INDEX``. Without ``--part-id`` only ``--num-parts 1`` (the default) is valid.
    """
    env = os.environ if env is None else env
    if num_parts < 1:
        raise UsageError(f"--num-parts {num_parts} must be 1 or more")
    if part_id is None:
        if num_parts > 1:
            raise UsageError(f"--num-parts {num_parts} needs --part-id (0..{num_parts - 1}, or auto)")
        return Part()
    source = "--part-id"
    if isinstance(part_id, str) and part_id.strip().lower() == "auto":
        var = next((v for v in PART_ID_VARIABLES if env.get(v, "").strip()), None)
        if var is None:
            raise UsageError("--part-id auto: neither $SLURM_ARRAY_TASK_ID (a SLURM job array) nor "
                             "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set; give the part number")
        index = _integer(env[var], f"${var}")
        source = f"${var}={index}"
        if var == "SLURM_ARRAY_TASK_ID" and env.get("SLURM_ARRAY_TASK_MIN", "").strip():
            low = _integer(env["SLURM_ARRAY_TASK_MIN"], "$SLURM_ARRAY_TASK_MIN")
            index -= low
            source += f" (less $SLURM_ARRAY_TASK_MIN={low})"
    else:
        index = part_id if isinstance(part_id, int) else _integer(part_id, "--part-id")
    if not 0 <= index < num_parts:
        hint = f" (submit the array as 0-{num_parts - 1}, or match --num-parts to it)" if source != "--part-id" else ""
        raise UsageError(f"{source}: part {index} is outside 0..{num_parts - 1} of --num-parts {num_parts}{hint}")
    return Part(num_parts, index)


# ---------------------------------------------------------------- per-part timing files


def part_timing_path(timing: Path, part: Part) -> Path:
    """``DIR/timing.csv`` -> ``DIR/timing.part-I-of-N.csv`` (the file itself for the whole list)."""
    if part.whole:
        return timing
    return timing.with_name(f"{_stem(timing)}.part-{part.part_id}-of-{part.num_parts}{_suffix(timing)}")


def _suffix(timing: Path) -> str:
    return timing.suffix if timing.suffix else ""


def _stem(timing: Path) -> str:
    return timing.name[: len(timing.name) - len(_suffix(timing))]


def part_timing_files(timing: Path) -> dict[int, dict[int, Path]]:
    """The part files beside a timing file: {N: {I: path}} for every ``STEM.part-I-of-N.SUFFIX`` there."""
    pattern = re.compile(re.escape(_stem(timing)) + r"\.part-(\d+)-of-(\d+)" + re.escape(_suffix(timing)) + "$")
    found: dict[int, dict[int, Path]] = {}
    try:
        names = sorted(p.name for p in timing.parent.iterdir())
    except OSError:
        return found
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) < int(m.group(2)):
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = timing.parent / name
    return found


# ---------------------------------------------------------------- resume


def npz_output_problem(out: Path, shape: tuple[int, ...], dtype: np.dtype | None) -> str | None:
    """Why an existing ``segs`` NPZ output cannot stand as the result of a case of that ``shape``
    (and ``dtype``; None: uint8 or uint16), or None when it reads back whole and fits. Reads (and so
    CRC-checks) the whole array."""
    try:
        with np.load(out, allow_pickle=False) as data:
            if "segs" not in data.files:
                return "it holds no 'segs' array"
            segs = data["segs"]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        return f"it is unreadable ({exc.__class__.__name__})"
    if segs.shape != tuple(shape):
        return f"its shape {segs.shape} is not the case's {tuple(shape)}"
    accepted = (np.dtype(np.uint8), np.dtype(np.uint16)) if dtype is None else (np.dtype(dtype),)
    if segs.dtype not in accepted:
        return f"its dtype {segs.dtype} is not {' or '.join(map(str, accepted))}"
    return None


def labels_output_problem(out: Path, image) -> str | None:
    """Why an existing label image (``segment``'s output) cannot stand as the result of ``image``
    (a :class:`mcp_medsam.io.medical.MedicalImage`), or None when it reads back on the same grid."""
    from .io import medical

    try:
        labels = medical.read_labels(out)
        medical.check_same_grid(labels, image)
    except InputError as exc:
        return str(exc)
    return None


def describe_redo(out: Path, why: str) -> str:
    """The note for an existing output that is redone."""
    return f"{out.name} exists but {why}: segmenting it again"


def exists(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False
