"""Distillation stage 1: the embedding cache (image embeddings, slices, labels and prompts per case).

The image encoder is frozen and shared by teacher and student, so its embedding is computed once
per slice and stored as float16 (``cache/<case>/emb.npy``), with the slice images (for the crops),
the label maps (for the fine-tune and the evaluation) and the prompts: every label of every cached
slice with its ground-truth box, and on 3D training cases propagated-style boxes (the bounding box
of the teacher's mask on the neighbouring slice, widened by the propagation margin, as 3D inference
builds them). A case is reused while its slices and teacher are the same (``done.json``, written last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcp_medsam.io.atomic import write_json
from mcp_medsam.preprocess import encoder_input, postprocess_logits
from mcp_medsam.prompts import box_to_grid, propagated_prompt, tight_box
from mcp_medsam_torch.model import LiteMedSAM

from .data import CaseReader, CaseRecord, DataIndex, evenly
from .distributed import state_digest

if TYPE_CHECKING:
    from .distill import DistillConfig

KIND_GT, KIND_PROP = 0, 1


@dataclass
class CachedCase:
    """One case's cache, memory-mapped. n cached slices, P prompts.

    emb (n, C, E, E) float16; img (n, H, W, 3) uint8; gt (n, H, W) uint16; new_hw (n, 2) int64;
    prompts: pos (P,) int64 (cached slice), label (P,) int64, kind (P,) int64 (0 gt box, 1 propagated),
    grid (P, 4) float32 box on the S grid, crop (P, 4) int64 crop box in original pixels (max inclusive).
    """

    record: CaseRecord
    emb: np.ndarray
    img: np.ndarray
    gt: np.ndarray
    new_hw: np.ndarray
    pos: np.ndarray
    label: np.ndarray
    kind: np.ndarray
    grid: np.ndarray
    crop: np.ndarray


@torch.no_grad()
def cache_case(rec: CaseRecord, folder: Path, *, slices: list[int], teacher: LiteMedSAM, held_out: bool,
                cfg: DistillConfig, device: torch.device, reader: CaseReader, digest: str) -> None:
    size = teacher.config.image_size
    imgs, gts, new_hw, images = [], [], [], []
    labels_of: list[tuple[int, ...]] = []
    lab = dict(zip(rec.slices, rec.labels))
    for z in slices:
        img, gt = reader.slice(rec, z)
        x, hw = encoder_input(img, size)
        imgs.append(img)
        gts.append(gt.astype(np.uint16))
        new_hw.append(hw)
        images.append(x)
        labels_of.append(lab[z])
    embs = []
    for i in range(0, len(images), cfg.batch_size):
        x = torch.from_numpy(np.stack(images[i:i + cfg.batch_size])).to(device)
        embs.append(teacher.image_encoder(x).to(torch.float16).cpu().numpy())
    emb = np.concatenate(embs)
    rng = np.random.default_rng([cfg.seed, 7])
    pos, labels, kind, grid, crop = [], [], [], [], []
    for i, z in enumerate(slices):
        h, w = gts[i].shape
        ids = labels_of[i]
        if held_out and len(ids) > cfg.eval_labels_per_slice:
            ids = tuple(sorted(rng.permutation(np.asarray(ids))[:cfg.eval_labels_per_slice].tolist()))
        for lab_id in ids:
            b = tight_box(gts[i] == lab_id)
            pos.append(i)
            labels.append(lab_id)
            kind.append(KIND_GT)
            grid.append(box_to_grid(b, h, w, size))
            crop.append(b)
    if rec.ndim == 3 and not held_out:
        # Propagated-style prompts: the teacher segments slice z from its gt box; the box of that
        # mask (+ margin) prompts the cached neighbours z - 1 and z + 1, as 3D inference walks.
        where = {z: i for i, z in enumerate(slices)}
        gt_rows = [j for j in range(len(pos)) if kind[j] == KIND_GT]
        for j0 in range(0, len(gt_rows), cfg.batch_size):
            rows = gt_rows[j0:j0 + cfg.batch_size]
            e = torch.from_numpy(emb[[pos[j] for j in rows]]).float().to(device)
            boxes = torch.from_numpy(np.stack([grid[j] for j in rows])).to(device)
            logits = teacher.decode(image_embeddings=e, boxes=boxes).masks[:, 0].float().cpu().numpy()
            for r, j in enumerate(rows):
                i = pos[j]
                h, w = gts[i].shape
                m = postprocess_logits(logits[r], new_hw[i], (h, w))
                if not m.any():
                    continue
                crop_b, grid_b = propagated_prompt(m, new_hw[i], size, cfg.prop_margin)
                for dz in (-1, 1):
                    k = where.get(slices[i] + dz)
                    if k is not None:
                        pos.append(k)
                        labels.append(labels[j])
                        kind.append(KIND_PROP)
                        grid.append(grid_b)
                        crop.append(crop_b)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "emb.npy", emb)
    np.save(folder / "img.npy", np.stack(imgs))
    np.save(folder / "gt.npy", np.stack(gts))
    np.savez(folder / "prompts.npz", pos=np.asarray(pos, dtype=np.int64), label=np.asarray(labels, dtype=np.int64),
             kind=np.asarray(kind, dtype=np.int64), grid=np.asarray(grid, dtype=np.float32).reshape(-1, 4),
             crop=np.asarray(crop, dtype=np.int64).reshape(-1, 4), new_hw=np.asarray(new_hw, dtype=np.int64))
    # Written last: a case without it is (re)computed on the next run.
    write_json(folder / "done.json", {"name": rec.name, "slices": slices, "teacher": digest, "held_out": held_out,
                                      "prompts": len(pos)})


def load_cached(rec: CaseRecord, folder: Path) -> CachedCase:
    p = np.load(folder / "prompts.npz")
    return CachedCase(record=rec, emb=np.load(folder / "emb.npy", mmap_mode="r"),
                      img=np.load(folder / "img.npy", mmap_mode="r"), gt=np.load(folder / "gt.npy", mmap_mode="r"),
                      new_hw=p["new_hw"], pos=p["pos"], label=p["label"], kind=p["kind"], grid=p["grid"],
                      crop=p["crop"])


def chosen_slices(rec: CaseRecord, k: int | None, *, paired: bool) -> list[int]:
    """The labelled slices to cache: all of them, or k spread evenly over the case. ``paired`` picks
    k / 2 evenly spaced slices each with its next labelled neighbour, so that subsampled 3D cases
    still get propagated-style prompts (they need a cached neighbour)."""
    zs = list(rec.slices)
    if not k or len(zs) <= k:
        return zs
    if not paired or rec.ndim != 3 or k < 2:
        return evenly(zs, k)
    anchors = evenly(list(range(len(zs) - 1)), k // 2)
    return sorted({zs[i] for a in anchors for i in (a, a + 1)})


def build_cache(cfg: DistillConfig, index: DataIndex, train_ids: list[int], val_ids: list[int],
                teacher: LiteMedSAM, device: torch.device) -> tuple[list[CachedCase], list[CachedCase]]:
    """Stage 1 (skips cases already cached with the same slices and teacher)."""
    from tqdm import tqdm

    out = Path(cfg.out_dir) / "cache"
    digest = state_digest(teacher)[:16]
    reader = CaseReader(max_cases=1)
    result: tuple[list[CachedCase], list[CachedCase]] = ([], [])
    jobs = [(i, False) for i in train_ids] + [(i, True) for i in val_ids]
    for i, held_out in tqdm(jobs, desc="cache", unit="case", disable=not cfg.progress):
        rec = index.cases[i]
        slices = chosen_slices(rec, cfg.eval_slices_per_case if held_out else cfg.max_slices_per_case,
                                paired=not held_out)
        folder = out / rec.key
        done = folder / "done.json"
        ok = False
        if done.is_file():
            d = json.loads(done.read_text())
            ok = d.get("slices") == slices and d.get("teacher") == digest and d.get("held_out") == held_out
        if not ok:
            cache_case(rec, folder, slices=slices, teacher=teacher, held_out=held_out, cfg=cfg, device=device,
                        reader=reader, digest=digest)
        result[int(held_out)].append(load_cached(rec, folder))
    return result
