"""Judging a run on held-out cases: training's validation set, and distillation's agreement.

Training (:func:`build_val_set`, :func:`evaluate`): a fixed, cheap set built once per run: for each
held-out case, up to ``slices_per_case`` labelled slices spread evenly over the case and up to
``labels_per_slice`` of their labels, with the untouched tight box (no flip, no jitter),
preprocessed by the same code as training. DSC is measured on the S x S grid, inside the resized
image (the padding excluded): cheap and stable from epoch to epoch, not the challenge metric at
original resolution.

Distillation (:func:`evaluate_agreement`): the cached held-out prompts at original resolution,
student against teacher and both against the labels.

Every Dice is :func:`mcp_medsam.evaluation.dice.dice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mcp_medsam.evaluation.dice import dice
from mcp_medsam.modality import CATEGORIES
from mcp_medsam.preprocess import postprocess_logits
from mcp_medsam_torch.model import LiteMedSAM, MCPMedSAM

from .augment import AugmentConfig, make_sample
from .clip_features import ClipFeatures
from .data import CaseReader, DataIndex, evenly
from .embedding_cache import CachedCase
from .prompt_draws import assemble


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
                scores.append(dice(pred[j, :nh, :nw], val.masks[i + j, :nh, :nw]))
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


@torch.no_grad()
def evaluate_agreement(student: MCPMedSAM, teacher: LiteMedSAM, val: list[CachedCase], *, tokens: tuple[str, ...],
                       clip: ClipFeatures, texts: torch.Tensor, batch_size: int, device: torch.device,
                       teacher_masks: dict | None = None) -> dict[str, Any]:
    """Held-out prompts (gt boxes) at original resolution: Dice(student, teacher), DSC(student, gt),
    DSC(teacher, gt); means over prompts and over modalities (each modality weighted equally).

    ``teacher_masks`` (a dict) memoises the teacher's masks between calls.
    """
    mc = student.config
    student.eval()
    memo = teacher_masks if teacher_masks is not None else {}
    rows = [(ci, j) for ci, c in enumerate(val) for j in range(len(c.pos))]
    per: list[tuple[str, float, float, float]] = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        b = assemble(val, chunk, [val[ci].grid[j] for ci, j in chunk], [val[ci].crop[j] for ci, j in chunk],
                     tokens=tokens, size=mc.image_size, crop_size=mc.embedding_size,
                     clip_size=mc.clip_crop_size if clip.enabled else None, with_target=False, device=device)
        feats = clip(b.crops_clip, [""] * len(chunk), use_cache=False)
        s_out = student.decode(image_embeddings=b.emb, boxes=b.boxes, crops=b.crops, clip_image_features=feats,
                               text_features=texts[b.token], category_idx=b.category)
        s_logits = s_out.masks[:, 0].float().cpu().numpy()
        missing = [r for r, key in enumerate(chunk) if key not in memo]
        if missing:
            t_logits = teacher.decode(image_embeddings=b.emb[missing], boxes=b.boxes[missing]).masks[:, 0]
            t_logits = t_logits.float().cpu().numpy()
        for r, (ci, j) in enumerate(chunk):
            c = val[ci]
            i = int(c.pos[j])
            gt = np.asarray(c.gt[i]) == c.label[j]
            hw = tuple(int(v) for v in c.new_hw[i])
            if (ci, j) not in memo:
                memo[(ci, j)] = postprocess_logits(t_logits[missing.index(r)], hw, gt.shape)
            tm = memo[(ci, j)]
            sm = postprocess_logits(s_logits[r], hw, gt.shape)
            per.append((c.record.modality, dice(sm, tm), dice(sm, gt), dice(tm, gt)))
    out: dict[str, Any] = {"prompts": len(per)}
    for n, name in enumerate(("agreement", "dsc_student", "dsc_teacher"), start=1):
        out[name] = float(np.mean([p[n] for p in per]))
        mods: dict[str, list[float]] = {}
        for p in per:
            mods.setdefault(p[0], []).append(p[n])
        out[f"{name}_by_modality"] = {m: float(np.mean(v)) for m, v in sorted(mods.items())}
        out[f"{name}_modality_mean"] = float(np.mean([np.mean(v) for v in mods.values()]))
    return out
