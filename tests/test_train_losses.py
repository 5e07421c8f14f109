"""Losses of Eq. 1 (monai-equivalent Dice, IoU target, contrastive) and distillation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mcp_medsam_torch.model import DecoderOutput
from mcp_medsam_torch.train.losses import contrastive_loss, dice_loss, distill_loss, iou_target, mcp_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_dice_loss_is_monai_squared_sigmoid() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    p = torch.sigmoid(logits)
    # monai DiceLoss(sigmoid=True, squared_pred=True): per (b, c), smooth_nr = smooth_dr = 1e-5, mean
    ref = torch.stack([1 - (2 * (p[b] * target[b]).sum() + 1e-5) / ((p[b] ** 2).sum() + (target[b] ** 2).sum() + 1e-5)
                       for b in range(3)]).mean()
    torch.testing.assert_close(dice_loss(logits, target), ref)
    perfect = torch.where(target > 0, 30.0, -30.0)
    assert float(dice_loss(perfect, target)) < 1e-6
    # both empty: smooth terms give 0 loss
    assert float(dice_loss(torch.full((1, 1, 4, 4), -50.0), torch.zeros(1, 1, 4, 4))) == pytest.approx(0.0, abs=1e-5)


def test_iou_target() -> None:
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1
    logits = torch.full((2, 1, 4, 4), -1.0)
    logits[0, 0, :1] = 1  # 4 of 8 pixels
    iou = iou_target(logits, target)
    assert iou.shape == (2, 1)
    assert iou[0, 0] == pytest.approx(0.5) and iou[1, 0] == 1.0  # both empty -> 1, not NaN


def test_contrastive_matches_the_official_formula_and_survives_zero_vectors() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    lab = torch.arange(4)
    ref = 0.5 * (F.cross_entropy(an @ bn.T, lab) + F.cross_entropy(bn @ an.T, lab))
    torch.testing.assert_close(contrastive_loss(a, b), ref)
    z = torch.zeros(4, 16, requires_grad=True)  # the warm start's content token without CLIP
    loss = contrastive_loss(z, b)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(4)) and torch.isfinite(z.grad).all()
    assert z.grad.abs().max() < 10


def test_mcp_loss_combines_weighted_terms() -> None:
    g = torch.Generator().manual_seed(2)
    out = DecoderOutput(torch.randn(2, 1, 8, 8, generator=g, requires_grad=True), torch.rand(2, 1, generator=g),
                        torch.randn(2, 11, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g))
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    cat = torch.tensor([0, 3])
    total, parts = mcp_loss(out, target, cat)
    expect = parts["dice"] + parts["bce"] + parts["iou"] + 0.01 * parts["category"] + 0.01 * parts["contrastive"]
    torch.testing.assert_close(total.detach(), expect)
    torch.testing.assert_close(parts["category"], F.cross_entropy(out.category, cat))
    total.backward()
    assert out.masks.grad is not None


def test_distill_loss_is_zero_gradient_at_the_teacher() -> None:
    t = torch.randn(2, 1, 8, 8)
    s = t.clone().requires_grad_(True)
    loss, parts = distill_loss(s, t, bce_weight=1.0, dice_weight=0.0)
    loss.backward()
    assert s.grad.abs().max() < 1e-6  # BCE to sigmoid(t) is minimal at s = t
    assert set(parts) == {"bce", "dice", "loss"}
