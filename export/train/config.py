"""What the run configs (:class:`~.loop.TrainConfig`, :class:`~.distill.DistillConfig`) share:
option help carried by the dataclass fields, lists of folders, plain values for checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping


def help_text(text: str) -> dict[str, str]:
    """Field metadata read by the command line (``__main__``): ``field(metadata=help_text(...))``."""
    return {"help": text}


def str_tuple(value: str | Path | Iterable[str | Path]) -> tuple[str, ...]:
    """One folder or several -> a tuple of strings (configs accept a bare path for ``data_dirs``)."""
    if isinstance(value, (str, Path)):
        return (str(value),)
    return tuple(str(v) for v in value)


def plain(obj: Any) -> Any:
    """Tuples to lists, recursively, for weights_only-loadable checkpoints and JSON."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
