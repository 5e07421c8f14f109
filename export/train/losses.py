"""Training losses (the paper's Eq. 1, docs/ARCHITECTURE.md) and the distillation loss (no monai dependency).

Shapes: mask logits (B, 1, S, S) float32; targets (B, 1, S, S) float32 in [0, 1] (0/1 for labels,
probabilities for distillation); IoU predictions (B, 1); category logits (B, K); content and dense
vectors (B, C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mcp_medsam_torch.model import DecoderOutput


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth_nr: float = 1e-5,
              smooth_dr: float = 1e-5) -> torch.Tensor:
    """``monai.losses.DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")``.

    Per sample and channel over the spatial dims: ``1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5)``
    with p = sigmoid(logits); mean over batch and channels. Soft targets are allowed.
    """
    p = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    inter = (p * target).sum(dims)
    denom = (p * p).sum(dims) + (target * target).sum(dims)
    return (1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)).mean()


def iou_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 1) float32 IoU of the thresholded prediction (sigmoid > 0.5, i.e. logit > 0) with the target.

    The official ``cal_iou`` divides 0 by 0 when both are empty (NaN); here that case is 1.
    """
    pred = logits > 0
    ref = target > 0.5
    dims = tuple(range(1, logits.ndim))
    inter = (pred & ref).sum(dims).float()
    union = (pred | ref).sum(dims).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).unsqueeze(1)


def _safe_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / ||x|| per row, as the official code; an all-zero row stays zero with a finite gradient.

    The LiteMedSAM warm start has an exactly zero content token (no CLIP tower, zero-initialised
    MLP), where x / ||x|| is NaN and F.normalize's clamped division has a 1/eps gradient.
    """
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > eps, norm, torch.ones_like(norm))


def contrastive_loss(content_vec: torch.Tensor, dense_vec: torch.Tensor) -> torch.Tensor:
    """CLIP-style loss over the batch: 0.5 * (CE(sim, i) + CE(sim^T, i)), sim = a b^T of the
    L2-normalised content token (before the transformer) and pooled dense embedding (no temperature,
    as the official code)."""
    a = _safe_normalize(content_vec.float())
    b = _safe_normalize(dense_vec.float())
    sim = a @ b.T
    labels = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))


@dataclass(frozen=True)
class LossWeights:
    seg: float = 1.0  # Dice + BCE
    iou: float = 1.0  # MSE of the IoU head against the IoU of the thresholded prediction
    category: float = 0.01  # modality classification CE
    contrastive: float = 0.01  # content token vs dense embedding


def mcp_loss(out: DecoderOutput, target: torch.Tensor, category: torch.Tensor, *,
             weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 1. out: the model's outputs; target (B, 1, S, S) 0/1 float32; category (B,) int64.

    Returns (total loss, detached components: total, dice, bce, iou, category, contrastive).
    Every term is always computed (times its weight, possibly 0) so that every head takes part
    in the graph, as DistributedDataParallel requires.
    """
    logits = out.masks.float()
    dice = dice_loss(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    with torch.no_grad():
        iou_gt = iou_target(logits, target)
    iou = F.mse_loss(out.iou.float(), iou_gt)
    ce = F.cross_entropy(out.category.float(), category)
    con = contrastive_loss(out.content_vec, out.dense_vec)
    total = weights.seg * (dice + bce) + weights.iou * iou + weights.category * ce + weights.contrastive * con
    parts = {"loss": total, "dice": dice, "bce": bce, "iou": iou, "category": ce, "contrastive": con}
    return total, {k: v.detach() for k, v in parts.items()}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, bce_weight: float = 1.0,
                 dice_weight: float = 1.0, student_iou: torch.Tensor | None = None,
                 teacher_iou: torch.Tensor | None = None, iou_weight: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Label-free distillation: BCE and soft Dice of the student logits (B, 1, S, S) to the
    teacher's sigmoid probabilities, plus optionally MSE between the IoU heads (B, 1)."""
    s = student_logits.float()
    p = torch.sigmoid(teacher_logits.float())
    bce = F.binary_cross_entropy_with_logits(s, p)
    dice = dice_loss(s, p)
    total = bce_weight * bce + dice_weight * dice
    parts = {"bce": bce, "dice": dice}
    if student_iou is not None and teacher_iou is not None:
        iou = F.mse_loss(student_iou.float(), teacher_iou.float())
        total = total + iou_weight * iou
        parts["iou"] = iou
    parts["loss"] = total
    return total, {k: v.detach() for k, v in parts.items()}
