"""Distillation prompts: drawing (case, prompt) pairs from the cache, jittering them, and assembling
the tensors both models take.

The draws reuse training's case choice (:class:`~.samplers.CaseChoice`: a modality uniformly, then a
case of it, or a case uniformly), then take one of the case's cached prompts uniformly. The prompt
of step s comes from ``default_rng([seed, stage, s])``, so a resumed stage draws what the
uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcp_medsam.preprocess import resize_aa
from mcp_medsam.prompts import crop_box, jitter_box

from .augment import mask_to_grid
from .data import DataError
from .embedding_cache import CachedCase
from .samplers import CaseChoice


@dataclass
class PromptBatch:
    """B prompts ready for the models: emb (B, C, E, E), boxes (B, 4), crops (B, 3, E, E),
    crops_clip (B, 3, C, C) or None, category (B,), token (B,), target (B, 1, S, S) labels (fine-tune)."""

    emb: torch.Tensor
    boxes: torch.Tensor
    crops: torch.Tensor
    crops_clip: torch.Tensor | None
    category: torch.Tensor
    token: torch.Tensor
    target: torch.Tensor | None


def assemble(cases: list[CachedCase], rows: list[tuple[int, int]], boxes: list[np.ndarray],
             crops: list[np.ndarray], *, tokens: tuple[str, ...], size: int, crop_size: int, clip_size: int | None,
             with_target: bool, device: torch.device) -> PromptBatch:
    """The tensors of B (case, prompt) rows with their grid boxes (B, 4) and crop boxes (B, 4):
    cached embeddings (float16 -> float32), content crops from the cached slices (``size`` grid,
    ``crop_size`` and, with CLIP, ``clip_size`` crops), categories, token rows and, ``with_target``,
    the label masks on the grid."""
    emb, c64, cclip, cats, toks, targets = [], [], [], [], [], []
    for (ci, j), cb in zip(rows, crops):
        c = cases[ci]
        i = int(c.pos[j])
        emb.append(np.asarray(c.emb[i], dtype=np.float32))
        patch = crop_box(np.asarray(c.img[i]), cb)
        c64.append(resize_aa(patch, crop_size))
        if clip_size:
            cclip.append(resize_aa(patch, clip_size))
        cats.append(c.record.category)
        toks.append(tokens.index(c.record.token))
        if with_target:
            targets.append(mask_to_grid(np.asarray(c.gt[i]) == c.label[j], tuple(c.new_hw[i]), size))
    t = lambda a, dt=None: torch.from_numpy(np.ascontiguousarray(np.stack(a), dtype=dt)).to(device)  # noqa: E731
    return PromptBatch(emb=t(emb), boxes=t(boxes, np.float32), crops=t(c64), crops_clip=t(cclip) if clip_size else None,
                       category=t(cats, np.int64), token=t(toks, np.int64),
                       target=t(targets, np.float32)[:, None] if with_target else None)


class PromptDraws:
    """Draws (case, prompt) pairs: a case by :class:`~.samplers.CaseChoice` (``kind`` modality or
    case), then one of its prompts uniformly; ``eligible`` restricts prompts per case (e.g. label present)."""

    def __init__(self, cases: list[CachedCase], *, kind: str, eligible: list[np.ndarray] | None = None) -> None:
        self.rows = eligible if eligible is not None else [np.arange(len(c.pos)) for c in cases]
        keep = [i for i, r in enumerate(self.rows) if len(r)]
        if not keep:
            raise DataError("no training prompts to draw from (no labelled slice in the training cases)")
        self.cases = CaseChoice([cases[i].record.category for i in keep], kind=kind, ids=keep)

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        ci = self.cases.draw(rng)
        r = self.rows[ci]
        return ci, int(r[rng.integers(len(r))])


def draw_batch(cases: list[CachedCase], draws: PromptDraws, rng: np.random.Generator, *, batch_size: int,
               jitter_prob: float, size: int, jitter: tuple[int, int] | None
               ) -> tuple[list[tuple[int, int]], list[np.ndarray], list[np.ndarray]]:
    """``batch_size`` (case, prompt) rows with their grid and crop boxes, each jittered with
    probability ``jitter_prob`` by shifts drawn from jitter=(lo, hi) per side (None: never)."""
    rows, boxes, crops = [], [], []
    for _ in range(batch_size):
        ci, j = draws.draw(rng)
        c = cases[ci]
        g, cb = c.grid[j], c.crop[j]
        if jitter is not None and rng.random() < jitter_prob:
            hw = c.gt.shape[1:3]
            g, cb = jitter_box(g, cb, rng.integers(jitter[0], jitter[1] + 1, size=4), hw=hw, size=size)
        rows.append((ci, j))
        boxes.append(np.asarray(g, dtype=np.float32))
        crops.append(np.asarray(cb))
    return rows, boxes, crops
