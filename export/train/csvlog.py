"""Per-step and per-evaluation CSV logs of a run (training and distillation)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class CsvLog:
    """Append rows to a CSV; the header is fixed when the file is created (resumes append).

    Floats are written with ``repr`` (full precision, so a resumed run can be compared exactly).
    """

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        if path.is_file() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f))
        else:
            self.columns = columns
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
