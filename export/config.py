"""What an export is asked to do (:class:`ExportConfig`) and how it fails (:class:`ExportError`).

A module of its own so that the exporter, INT8 quantisation and the precision variants share the
typed config (and :func:`swap_in`) without importing each other.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8")
TARGET_DICE = 0.985  # int8: least mean per-box mask Dice of the INT8 chain against FP32 (validation prompts)


class ExportError(RuntimeError):
    """An export that cannot be made or does not verify (the message says which and why)."""


@dataclass
class ExportConfig:
    out: Path
    checkpoint: Path | None = None  # None: the LiteMedSAM warm start
    clip: Path | None = None
    text_features: Path | None = None
    precision: str = "fp32"  # fp32 | fp16 (IR weights stored as float16) | int8 (NNCF)
    keep_onnx: bool = True
    verify_data: Path | None = None
    verify_cases: int = 3
    calibration_cases: int = 12
    int8_target_dice: float = TARGET_DICE
    description: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] = ()  # bf16, int8 (mcp_medsam_torch.precision); needs verify_data
    fold: bool = True  # fold input-independent parts of the per-box graph (mcp_medsam_torch.fold); IR only


def swap_in(tmp: Path, out: Path) -> None:
    """Replace the folder ``out`` by ``tmp`` (a sibling) so that a reader never sees a half-written folder."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
