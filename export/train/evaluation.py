"""Validation during training: a fixed, cheap set of held-out prompts and DSC per modality.

The set is built once per run: for each held-out case, up to ``slices_per_case`` labelled slices
spread evenly over the case and up to ``labels_per_slice`` of their labels, with the untouched
tight box (no flip, no jitter), preprocessed by the same code as training. DSC is measured on the
S x S grid, inside the resized image (the padding excluded): cheap and stable from epoch to
epoch, not the challenge metric at original resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcp_medsam.modality import CATEGORIES

from .augment import AugmentConfig, make_sample
from .data import CaseReader, DataIndex


def dice_score(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """2|A and B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    if torch.is_tensor(pred):
        pred, ref = pred.bool(), ref.bool()
        inter = int((pred & ref).sum())
        total = int(pred.sum()) + int(ref.sum())
    else:
        pred, ref = pred.astype(bool), ref.astype(bool)
        inter = int(np.logical_and(pred, ref).sum())
        total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def evenly(items: tuple | list, k: int) -> list:
    """Up to k items spread evenly over the sequence (all of them when it is short)."""
    if k <= 0 or len(items) <= k:
        return list(items)
    pos = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in sorted(set(pos.tolist()))]


@dataclass
class ValSet:
    """Held-out prompts. images (N, 3, S, S) float32, one per slice; per prompt P: image_of (P,)
    int64, boxes (P, 4) float32, crops (P, 3, E, E) float32, crops_clip (P, 3, C, C) float32 or None,
    masks (P, S, S) bool, new_hw (P, 2) int64, category (P,) int64, token (P,) int64, modality[P]."""

    images: np.ndarray
    image_of: np.ndarray
    boxes: np.ndarray
    crops: np.ndarray
    crops_clip: np.ndarray | None
    masks: np.ndarray
    new_hw: np.ndarray
    category: np.ndarray
    token: np.ndarray
    modality: list[str]

    def __len__(self) -> int:
        return len(self.boxes)


def build_val_set(index: DataIndex, *, tokens: tuple[str, ...], augment: AugmentConfig, slices_per_case: int = 4,
                  labels_per_slice: int = 4, seed: int = 0) -> ValSet:
    cfg = AugmentConfig(image_size=augment.image_size, crop_size=augment.crop_size,
                        clip_crop_size=augment.clip_crop_size, flip_prob=0.0, box_jitter=0,
                        clip_crops=augment.clip_crops)
    reader = CaseReader(max_cases=1)
    images, rows = [], []
    rng = np.random.default_rng(seed)
    for rec in index.cases:
        pairs = list(zip(rec.slices, rec.labels))
        for z, labels in evenly(pairs, slices_per_case):
            img, gt = reader.slice(rec, z)
            chosen = sorted(rng.permutation(np.asarray(labels))[:labels_per_slice].tolist()) \
                if len(labels) > labels_per_slice else list(labels)
            for j, lab in enumerate(chosen):
                s = make_sample(img, gt, int(lab), rng=rng, cfg=cfg)
                if j == 0:
                    images.append(s["image"])
                rows.append((len(images) - 1, s, rec))
    if not rows:
        raise ValueError("empty validation set")
    return ValSet(
        images=np.stack(images),
        image_of=np.array([r[0] for r in rows], dtype=np.int64),
        boxes=np.stack([r[1]["box"] for r in rows]),
        crops=np.stack([r[1]["crop"] for r in rows]),
        crops_clip=np.stack([r[1]["crop_clip"] for r in rows]) if cfg.clip_crops else None,
        masks=np.stack([r[1]["mask"][0] > 0 for r in rows]),
        new_hw=np.stack([r[1]["new_hw"] for r in rows]),
        category=np.array([r[2].category for r in rows], dtype=np.int64),
        token=np.array([tokens.index(r[2].token) for r in rows], dtype=np.int64),
        modality=[CATEGORIES[r[2].category] for r in rows],
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ValSet, *, device: torch.device, clip_features: torch.Tensor,
             text_table: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Mean DSC per modality (``dsc_<Modality>``), their mean (``dsc_mean``, modalities weighted
    equally) and the mean over prompts (``dsc_prompts``). ``clip_features`` (P, D) on ``device``.

    Runs the model in eval mode and restores the caller's train/eval modes afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        emb = torch.cat([model.image_encoder(torch.from_numpy(val.images[i:i + batch_size]).to(device))
                         for i in range(0, len(val.images), batch_size)])
        scores = []
        for i in range(0, len(val), batch_size):
            sl = slice(i, i + batch_size)
            out = model.decode(
                image_embeddings=emb[torch.from_numpy(val.image_of[sl]).to(device)],
                boxes=torch.from_numpy(val.boxes[sl]).to(device),
                crops=torch.from_numpy(val.crops[sl]).to(device),
                clip_image_features=clip_features[sl],
                text_features=text_table[torch.from_numpy(val.token[sl]).to(device)],
                category_idx=torch.from_numpy(val.category[sl]).to(device),
            )
            pred = (out.masks[:, 0] > 0).cpu().numpy()
            for j in range(pred.shape[0]):
                nh, nw = val.new_hw[i + j]
                scores.append(dice_score(pred[j, :nh, :nw], val.masks[i + j, :nh, :nw]))
    finally:
        for m, t in modes.items():
            m.training = t
    result: dict[str, float] = {}
    per_mod: dict[str, list[float]] = {}
    for s, m in zip(scores, val.modality):
        per_mod.setdefault(m, []).append(s)
    for m in sorted(per_mod):
        result[f"dsc_{m}"] = float(np.mean(per_mod[m]))
    result["dsc_mean"] = float(np.mean([np.mean(v) for v in per_mod.values()]))
    result["dsc_prompts"] = float(np.mean(scores))
    return result
