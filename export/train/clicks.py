"""Teaching the decoder clicks (issue 24): simulated CVPR 2025 sessions on cached embeddings, on the CPU.

What a step does, for B prompts drawn as distillation draws them (a modality, a case, one of its cached
given or propagation-style boxes whose label is on the slice; :mod:`.prompt_draws`):

1. the student's box-only logits (B, 1, 256, 256), held by a distillation term (BCE + soft Dice) to the
   box-only logits of today's default model (the exported ``teacher`` folder, run once per cached
   prompt by the runtime's own engine and stored in ``teacher/<case>.npy``), so that the box round
   keeps today's masks;
2. a session of n clicks (n uniform in 1..``max_clicks``, one n per step): each round adds one click
   per prompt by the challenge's rule (:func:`mcp_medsam.interactive.clicks.next_click`: the maximum of
   the distance transform of the largest 8-connected error component; foreground where the truth is
   the object) on the model's own previous prediction (rounds before the last without gradients), on
   the 256 grid inside the resized image (clicks are grid pixel indices: the graph adds 0.5);
3. the last round's logits against the label mask: Dice + BCE (the seg part of the paper's Eq. 1).

Frozen: the image encoder (embeddings cached by :mod:`.embedding_cache`), the crop CNN (its output is
one constant for the shipped weights: computed once) and every part not under ``train_prefixes``.
Steps are a pure function of (seed, step) and the learning rate of the step alone, so a resumed run
(``clicks_last.pth``) continues exactly.

:func:`evaluate_sessions` judges the held-out cases as the challenge scores a 2D session: a box round
and ``rounds`` click rounds at the original resolution (masks postprocessed as inference does),
DSC per round, per prompt and per modality.

Outputs in ``out_dir``: ``cache/`` (hard links of ``cache_from`` where given), ``teacher/``,
``clicks_last.pth`` / ``clicks.pth`` (official layout: :func:`mcp_medsam_torch.checkpoints.load_mcp_medsam`),
``clicks_steps.csv``, ``summary.json`` (config, split, step time, held-out rounds before and after).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mcp_medsam.interactive.clicks import next_click
from mcp_medsam.io.atomic import write_json
from mcp_medsam.manifest import bundled_weights, load_manifest
from mcp_medsam.preprocess import postprocess_logits
from mcp_medsam.prompts import PROPAGATION_MARGIN, points_to_grid
from mcp_medsam_torch.checkpoints import (
    CheckpointError, load_litemedsam, load_mcp_medsam, warm_start_from_litemedsam,
)
from mcp_medsam_torch.model import LiteMedSAM, MCPMedSAM, build_litemedsam

from .checkpointing import atomic_save, restore
from .config import help_text as _h
from .config import plain, str_tuple
from .csvlog import CsvLog
from .data import DataError, build_index
from .distributed import state_digest
from .embedding_cache import CachedCase, build_cache, chosen_slices
from .losses import dice_loss, distill_loss
from .prompt_draws import PromptDraws, assemble, draw_batch

# Held out of the shipped recipe (5 modalities, 2D and 3D): judged, never trained on.
HELD_OUT = ("2DBox_Dermoscopy_PH2_IMD009.npz", "2DBox_Endoscopy_KvasirSEG_cju0roawvklrq0799vmjorwfv.npz",
            "2DBox_US_HC18_001.npz", "2DBox_XRay_Shenzhen_CHNCXR-0004-0.npz", "2DBox_Microscopy_NIH3T3_dna-26.npz",
            "3DBox_MR_MSDHippocampus_006.npz", "3DBox_CT_STS_STS-002.npz")
TRAIN_PREFIXES = ("prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.",
                  "mask_decoder.transformer.", "mask_decoder.output_hypernetworks_mlps.0.")
POINT_PREFIXES = ("prompt_encoder.point_embeddings.",)


@dataclass
class ClickConfig:
    """Click fine-tune of the decoder on cached embeddings (stored in every checkpoint)."""

    data_dirs: tuple[str, ...] = field(metadata=_h("Folders of CVPR24 .npz cases (either layout)."))
    out_dir: str = field(metadata=_h("Output folder: cache, teacher logits, checkpoints, logs."))
    init: str = field(default="warm_start", metadata=_h(
        "Start weights: 'warm_start' (MCP-MedSAM warm-started from LiteMedSAM), an MCP-MedSAM checkpoint, or "
        "an exported folder without CLIP tower (e.g. weights: its model recovered from the IR by "
        "mcp_medsam_torch.recover)."))
    teacher: str | None = field(default=None, metadata=_h(
        "Exported model folder whose box-only masks the box round keeps (default: the bundled weights)."))
    held_out: tuple[str, ...] = field(default=HELD_OUT, metadata=_h(
        "Case file names kept out of training and judged (none: train on every case, judge nothing)."))
    cache_from: str | None = field(default=None, metadata=_h(
        "Another run's cache/ folder (distill or clicks) to reuse by hard links."))
    variant: str = field(default="mcp_medsam", metadata=_h("Model variant (tiny: tests)."))
    steps: int = field(default=300, metadata=_h("Optimizer steps."))
    batch_size: int = field(default=8, metadata=_h("Prompts per step."))
    max_clicks: int = field(default=5, metadata=_h("Clicks of the longest simulated session."))
    lr: float = field(default=2e-5, metadata=_h("AdamW learning rate of the trained decoder parts."))
    point_lr: float = field(default=1e-3, metadata=_h("AdamW learning rate of the point label embeddings."))
    warmup_steps: int = field(default=20, metadata=_h("Linear learning-rate warm-up steps."))
    distill_weight: float = field(default=1.0, metadata=_h("Weight of the box-only term (BCE + Dice to the teacher)."))
    train_prefixes: tuple[str, ...] = field(default=TRAIN_PREFIXES, metadata=_h("Parameter prefixes trained."))
    amp: bool = field(default=True, metadata=_h("bfloat16 autocast (CPUs with AVX512-BF16/AMX, CUDA)."))
    save_every: int = field(default=10, metadata=_h("Write clicks_last.pth every N steps."))
    rounds: int = field(default=5, metadata=_h("Click rounds of the held-out judging."))
    eval_slices_per_case: int = field(default=3, metadata=_h("Cached slices per held-out 3D case."))
    eval_labels_per_slice: int = field(default=8, metadata=_h("Judged labels per held-out slice."))
    max_slices_per_case: int | None = field(default=None, metadata=_h("Cached slices per training case."))
    prop_margin: int = field(default=PROPAGATION_MARGIN, metadata=_h("Margin of propagation-style boxes."))
    seed: int = field(default=0, metadata=_h("Seed of the draws."))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads."))
    progress: bool = field(default=True, metadata=_h("Show progress bars."))

    def __post_init__(self) -> None:
        self.data_dirs = str_tuple(self.data_dirs)
        self.held_out = tuple(self.held_out)
        self.train_prefixes = str_tuple(self.train_prefixes)
        if self.max_clicks < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError("max_clicks and batch_size must be >= 1, steps >= 0")


# ------------------------------------------------------------------------------------------ models

def _student(cfg: ClickConfig) -> MCPMedSAM:
    if cfg.init == "warm_start":
        model, _, _ = warm_start_from_litemedsam(seed=cfg.seed)
    elif Path(cfg.init).is_dir():  # an exported folder: its model recovered from the IR
        from mcp_medsam_torch.recover import recover_checkpoint

        model, _ = recover_checkpoint(Path(cfg.init), warm_start_from_litemedsam(seed=cfg.seed)[0])
    else:
        model, _ = load_mcp_medsam(cfg.init, variant=cfg.variant if cfg.variant != "mcp_medsam" else None)
    return model.eval()


def _encoder(cfg: ClickConfig, student: MCPMedSAM) -> LiteMedSAM:
    """The model the embedding cache is built with: LiteMedSAM (its encoder is the student's, as in the
    distillation cache, whose cases are then reused); for other variants a random LiteMedSAM with the
    student's encoder (tests)."""
    if cfg.variant == "mcp_medsam":
        encoder = load_litemedsam()
        if state_digest(encoder.image_encoder) != state_digest(student.image_encoder):
            raise CheckpointError(f"{cfg.init}: the student's image encoder is not LiteMedSAM's (the cache's)")
        return encoder
    torch.manual_seed(cfg.seed)
    encoder = build_litemedsam(cfg.variant).eval()
    encoder.image_encoder.load_state_dict(student.image_encoder.state_dict())
    return encoder


def bf16_supported() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where autocast pays."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def constant_dense(model: MCPMedSAM) -> torch.Tensor | None:
    """(1, C, E, E) output of a crop CNN whose last conv is all zeros (the shipped weights'; the same for
    every crop), else None (a live crop CNN runs per prompt)."""
    net = model.prompt_encoder.crop_nets
    last = getattr(net, f"conv{net.num_blocks + 1}")
    if bool(last.weight.detach().eq(0).all()):
        e = model.config.embedding_size
        with torch.no_grad():
            return net(torch.zeros(1, 3, e, e)).detach()
    return None


def skip_identity_blocks(model: MCPMedSAM) -> list[str]:
    """F4 residual blocks ``x + conv2(...)`` whose conv2 is frozen and all zeros are the identity: run
    them as such (the same outputs; the shipped weights have three, 7 GFLOP per prompt and pass).
    Returns their names. Call after :func:`set_click_trainable`."""
    from mcp_medsam_torch.model.common import DecoderResBlock

    names = []
    for name, m in model.mask_decoder.named_modules():
        if isinstance(m, DecoderResBlock) and not m.conv2.weight.requires_grad \
                and bool(m.conv2.weight.detach().eq(0).all()):
            m.forward = _identity  # an instance attribute: this model only, state_dict unchanged
            names.append(f"mask_decoder.{name}")
    return names


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def set_click_trainable(model: MCPMedSAM, prefixes: tuple[str, ...]) -> tuple[list, list]:
    """requires_grad only under ``prefixes``; returns (point embedding params, other trained params)."""
    points, other = [], []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
        if p.requires_grad:
            (points if n.startswith(POINT_PREFIXES) else other).append(p)
    return points, other


def decode(model: MCPMedSAM, b: Any, texts: torch.Tensor, dense: torch.Tensor | None,
           coords: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, S, S) logits of a :class:`~.prompt_draws.PromptBatch` with optional clicks."""
    zeros = torch.zeros(len(b.boxes), model.config.clip_dim, device=b.boxes.device)
    return model.decode(image_embeddings=b.emb, boxes=b.boxes, crops=b.crops, clip_image_features=zeros,
                        text_features=texts[b.token], category_idx=b.category, point_coords=coords,
                        point_labels=labels, dense=dense).masks


def pad_clicks(clicks: list[list[tuple[float, float, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt lists of (x, y, label) -> (B, P, 2) float32 and (B, P) float32 padded with label -1
    (P >= 1)."""
    p = max([len(c) for c in clicks] + [1])
    coords = torch.zeros(len(clicks), p, 2)
    labels = torch.full((len(clicks), p), -1.0)
    for i, cs in enumerate(clicks):
        for j, (x, y, lab) in enumerate(cs):
            coords[i, j, 0], coords[i, j, 1], labels[i, j] = x, y, lab
    return coords, labels


def grid_click(logits: np.ndarray, target: np.ndarray, new_hw: tuple[int, int]) -> tuple[float, float, float] | None:
    """The challenge's next click on the S grid: logits (S, S), target (S, S) 0/1, inside the resized
    image (new_h, new_w) -> (x, y, 1.0 fg / 0.0 bg) in grid pixel indices, or None when they agree."""
    nh, nw = new_hw
    c = next_click(logits[:nh, :nw] > 0, target[:nh, :nw] > 0)
    if c is None:
        return None
    return float(c.at[1]), float(c.at[0]), 1.0 if c.foreground else 0.0


# ------------------------------------------------------------------------------------------- teacher

def teacher_logits(cases: list[CachedCase], folder: Path, out: Path, *, progress: bool) -> list[np.ndarray]:
    """(P, S, S) float16 box-only logits of an exported model for every cached prompt of each case, by
    the runtime's engine (box-only feed), stored per case and reused while the teacher's files are the
    same."""
    from tqdm import tqdm

    from mcp_medsam.engine import Engine
    from mcp_medsam.prompts import content_crops, decoder_feed

    manifest = load_manifest(folder)
    key = manifest.raw.get("files", {})
    stamp = json.dumps(key, sort_keys=True)
    out.mkdir(parents=True, exist_ok=True)
    engine = None
    result = []
    for c in tqdm(cases, desc="teacher", unit="case", disable=not progress):
        path, done = out / f"{c.record.key}.npy", out / f"{c.record.key}.json"
        if path.is_file() and done.is_file() and json.loads(done.read_text()).get("teacher") == stamp \
                and np.load(path, mmap_mode="r").shape[0] == len(c.pos):
            result.append(np.load(path, mmap_mode="r"))
            continue
        engine = engine or Engine(manifest, precision="fp32")
        row = manifest.modality_row(c.record.token)
        logits = []
        for i0 in range(0, len(c.pos), 8):
            js = range(i0, min(i0 + 8, len(c.pos)))
            emb = np.stack([np.asarray(c.emb[int(c.pos[j])], np.float32) for j in js])
            crops = np.concatenate([content_crops(np.asarray(c.img[int(c.pos[j])]), c.crop[j][None],
                                                  manifest.crop_size) for j in js])
            feed = decoder_feed(embeddings=emb, embedding_index=np.arange(len(js)), boxes=c.grid[list(js)],
                                crops=crops, modality_index=np.full(len(js), row, np.int64))
            logits.append(engine.decode(feed)[0].astype(np.float16))
        np.save(path, np.concatenate(logits))
        write_json(done, {"teacher": stamp, "prompts": len(c.pos)})
        result.append(np.load(path, mmap_mode="r"))
    return result


# ---------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_sessions(model: MCPMedSAM, cases: list[CachedCase], *, texts: torch.Tensor, tokens: tuple[str, ...],
                      dense: torch.Tensor | None, rounds: int, teacher: list[np.ndarray] | None = None,
                      amp: bool = False) -> dict[str, Any]:
    """Box round + ``rounds`` click rounds per held-out (slice, label) at the original resolution.

    Each round's click: the challenge's rule on the (H, W) prediction against the truth, as pixel
    indices, put on the grid by :func:`mcp_medsam.prompts.points_to_grid`. Returns the mean DSC per
    round over prompts (``dsc``) and as the mean of modality means (``dsc_modality_mean``), the DSC AUC
    (trapezoid over click rounds 1..R, as the challenge), per modality rows, and with ``teacher`` the
    teacher's box-round DSC and the per-box Dice of the student's box-round masks with the teacher's.
    """
    from mcp_medsam.evaluation.dice import dice

    size = model.config.image_size
    per: list[dict[str, Any]] = []
    for ci, c in enumerate(cases):
        for j in range(len(c.pos)):
            i = int(c.pos[j])
            gt = np.asarray(c.gt[i]) == c.label[j]
            if not gt.any() or c.kind[j] != 0:
                continue
            h, w = gt.shape
            hw = tuple(int(v) for v in c.new_hw[i])
            b = assemble([c], [(0, j)], [c.grid[j]], [c.crop[j]], tokens=tokens, size=size,
                         crop_size=model.config.embedding_size, clip_size=None, with_target=False,
                         device=torch.device("cpu"))
            clicks: list[tuple[float, float, float]] = []
            dscs = []
            for r in range(rounds + 1):
                coords, labels = pad_clicks([clicks]) if clicks else (None, None)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    logits = decode(model, b, texts, dense, coords, labels)
                pred = postprocess_logits(logits[0, 0].float().numpy(), hw, (h, w))
                dscs.append(dice(gt, pred))
                if r == 0:
                    row: dict[str, Any] = {"case": c.record.name, "modality": c.record.modality, "slice": i,
                                           "label": int(c.label[j])}
                    if teacher is not None:
                        t = postprocess_logits(np.asarray(teacher[ci][j], np.float32), hw, (h, w))
                        row["teacher_box_dsc"] = dice(gt, t)
                        row["box_agreement"] = dice(t, pred) if (t.any() or pred.any()) else 1.0
                click = next_click(pred, gt)
                if click is not None:
                    x, y = points_to_grid(np.array([click.at[1], click.at[0]]), h, w, size)
                    clicks.append((float(x), float(y), 1.0 if click.foreground else 0.0))
            row["dsc"] = dscs
            per.append(row)
    if not per:
        return {}
    dsc = np.array([p["dsc"] for p in per])
    mods = sorted({p["modality"] for p in per})
    by_mod = {m: np.mean([p["dsc"] for p in per if p["modality"] == m], axis=0) for m in mods}
    mod_mean = np.mean([by_mod[m] for m in mods], axis=0)
    out = {"prompts": len(per), "dsc": dsc.mean(0).round(4).tolist(),
           "dsc_modality_mean": mod_mean.round(4).tolist(),
           "auc_modality_mean": float(np.trapezoid(mod_mean[1:], dx=1)) if rounds > 1 else None,
           "per_modality": {m: v.round(4).tolist() for m, v in by_mod.items()}, "rows": per}
    if teacher is not None:
        out["teacher_box_dsc"] = float(np.mean([p["teacher_box_dsc"] for p in per]))
        out["teacher_box_dsc_modality_mean"] = float(np.mean(
            [np.mean([p["teacher_box_dsc"] for p in per if p["modality"] == m]) for m in mods]))
        agree = np.array([p["box_agreement"] for p in per])
        out["box_agreement_mean"] = float(agree.mean())
        out["box_agreement_min"] = float(agree.min())
    return out


@torch.no_grad()
def box_agreement(model: MCPMedSAM, cases: list[CachedCase], teacher: list[np.ndarray], *, texts: torch.Tensor,
                  tokens: tuple[str, ...], dense: torch.Tensor | None, batch: int = 8) -> dict[str, Any]:
    """Per-box Dice of the model's box-only masks with the teacher's at the original resolution, over
    every cached prompt (given and propagation-style boxes of every cached slice). An empty pair
    agrees (1). Returns mean, min, the share >= 0.98, and 2D / 3D means."""
    size = model.config.image_size
    agree: list[float] = []
    dims: list[int] = []
    for ci, c in enumerate(cases):
        for j0 in range(0, len(c.pos), batch):
            js = list(range(j0, min(j0 + batch, len(c.pos))))
            b = assemble([c], [(0, j) for j in js], [c.grid[j] for j in js], [c.crop[j] for j in js], tokens=tokens,
                         size=size, crop_size=model.config.embedding_size, clip_size=None, with_target=False,
                         device=torch.device("cpu"))
            logits = decode(model, b, texts, dense).numpy()[:, 0]
            for k, j in enumerate(js):
                i = int(c.pos[j])
                hw, orig = tuple(int(v) for v in c.new_hw[i]), tuple(c.gt.shape[1:])
                ours = postprocess_logits(logits[k], hw, orig)
                theirs = postprocess_logits(np.asarray(teacher[ci][j], np.float32), hw, orig)
                total = int(ours.sum()) + int(theirs.sum())
                agree.append(1.0 if total == 0 else 2.0 * int((ours & theirs).sum()) / total)
                dims.append(c.record.ndim)
    a, d = np.asarray(agree), np.asarray(dims)
    return {"boxes": int(len(a)), "mean": float(a.mean()), "min": float(a.min()),
            "share_ge_0.98": float((a >= 0.98).mean()),
            "mean_2d": float(a[d == 2].mean()) if (d == 2).any() else None,
            "mean_3d": float(a[d == 3].mean()) if (d == 3).any() else None}


# ----------------------------------------------------------------------------------------------- run

def _link_cache(src: Path, dst: Path, records: list, held_out: list, encoder: LiteMedSAM, cfg: ClickConfig) -> int:
    """Hard links of another run's cached cases where they are exactly what this run would cache (same
    slices, split, encoder; ``held_out[i]`` for ``records[i]``): :func:`~.embedding_cache.build_cache`
    then reuses them and never writes into a linked file. Returns the number of cases linked."""
    digest = state_digest(encoder)[:16]
    linked = 0
    for rec, held in zip(records, held_out):
        case, mine = src / rec.key, dst / rec.key
        if not (case / "done.json").is_file() or (mine / "done.json").exists():
            continue
        d = json.loads((case / "done.json").read_text())
        want = chosen_slices(rec, cfg.eval_slices_per_case if held else cfg.max_slices_per_case, paired=not held)
        if d.get("slices") != want or d.get("held_out") is not held or d.get("teacher") != digest:
            continue
        mine.mkdir(parents=True, exist_ok=True)
        for f in case.iterdir():
            os.link(f, mine / f.name)
        linked += 1
    return linked


def _cache_settings(cfg: ClickConfig) -> SimpleNamespace:
    """What :func:`~.embedding_cache.build_cache` reads of a run config."""
    return SimpleNamespace(out_dir=cfg.out_dir, batch_size=cfg.batch_size, seed=cfg.seed,
                           eval_labels_per_slice=cfg.eval_labels_per_slice, prop_margin=cfg.prop_margin,
                           max_slices_per_case=cfg.max_slices_per_case, eval_slices_per_case=cfg.eval_slices_per_case,
                           progress=cfg.progress)


def run_click_training(cfg: ClickConfig) -> Path:
    """Cache -> teacher logits -> held-out judging (before) -> steps -> judging (after); returns the
    final checkpoint. Resumable: rerun the same config (raise ``steps`` to continue a finished run)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["config"] = plain(asdict(cfg))
    device = torch.device("cpu")
    student = _student(cfg)
    encoder = _encoder(cfg, student)
    index = build_index(cfg.data_dirs, cache_path=out / "data_index.json", progress=cfg.progress)
    names = [c.name for c in index.cases]
    unknown = [n for n in cfg.held_out if n not in names]
    if unknown:
        raise DataError(f"held-out cases not found in the data folders: {', '.join(unknown)}")
    val_ids = [i for i, n in enumerate(names) if n in cfg.held_out]
    train_ids = [i for i in range(len(names)) if i not in val_ids]
    if cfg.cache_from:
        ids = train_ids + val_ids
        summary["cache_linked"] = _link_cache(Path(cfg.cache_from), out / "cache", [index.cases[i] for i in ids],
                                              [i in val_ids for i in ids], encoder, cfg)
    t0 = time.time()
    train, val = build_cache(_cache_settings(cfg), index, train_ids, val_ids, encoder, device)
    summary["split"] = {"train": [c.record.name for c in train], "held_out": [c.record.name for c in val]}
    summary.setdefault("timings_s", {}).setdefault("cache", time.time() - t0)
    teacher_dir = Path(cfg.teacher) if cfg.teacher else bundled_weights()
    t_train = teacher_logits(train, teacher_dir, out / "teacher", progress=cfg.progress)
    t_val = teacher_logits(val, teacher_dir, out / "teacher", progress=cfg.progress) if val else None
    summary["teacher"] = str(teacher_dir)
    tokens = index.tokens
    texts = torch.zeros(len(tokens), student.config.clip_dim)
    dense = constant_dense(student)
    use_amp = cfg.amp and bf16_supported()

    def judge(tag: str) -> None:
        if val and tag not in summary:
            student.eval()
            res = evaluate_sessions(student, val, texts=texts, tokens=tokens, dense=dense, rounds=cfg.rounds,
                                    teacher=t_val)
            summary[tag] = res
            write_json(summary_path, summary)
            print(f"{tag}: DSC per round {res['dsc_modality_mean']} (mean of modality means), "
                  f"box agreement with the teacher {res.get('box_agreement_mean', float('nan')):.4f}")

    judge("before")
    final = train_clicks(cfg, student, train, t_train, texts=texts, tokens=tokens, dense=dense, amp=use_amp,
                         summary=summary)
    summary.pop("after", None)
    judge("after")
    summary["box_agreement_sample"] = box_agreement(student, train + val, t_train + (t_val or []), texts=texts,
                                                    tokens=tokens, dense=dense)
    print(f"box-only agreement with the teacher per box: {summary['box_agreement_sample']}")
    summary["final_checkpoint"] = str(final)
    write_json(summary_path, summary)
    return final


def train_clicks(cfg: ClickConfig, student: MCPMedSAM, train: list[CachedCase], teacher: list[np.ndarray], *,
                 texts: torch.Tensor, tokens: tuple[str, ...], dense: torch.Tensor | None, amp: bool,
                 summary: dict[str, Any]) -> Path:
    """The optimisation loop (module doc); returns ``clicks.pth``."""
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    last, final = out / "clicks_last.pth", out / "clicks.pth"
    size = student.config.image_size
    points, other = set_click_trainable(student, cfg.train_prefixes)
    summary["identity_blocks"] = skip_identity_blocks(student)
    groups = [{"params": points, "base_lr": cfg.point_lr, "name": "points"},
              {"params": other, "base_lr": cfg.lr, "name": "decoder"}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=0.0)
    start = 0
    for path in (last, final):
        if path.is_file():
            from mcp_medsam_torch.checkpoints import read_checkpoint

            ck = read_checkpoint(path)
            if start < int(ck.get("step", 0)):
                start = restore(student, ck, path, optimizer)
    if start >= cfg.steps and final.is_file():
        return final
    eligible = [np.flatnonzero([c.label[j] in np.asarray(c.gt[int(c.pos[j])]) for j in range(len(c.pos))])
                for c in train]
    draws = PromptDraws(train, kind="modality", eligible=eligible)
    log = CsvLog(out / "clicks_steps.csv", ["step", "loss", "click_dice", "click_bce", "distill", "clicks",
                                            "lr", "sec_per_step"])

    def save(path: Path, step: int, loss: float) -> None:
        atomic_save({"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "loss": loss,
                     "step": step, "config": plain(asdict(cfg)), "kind": "mcp-medsam-clicks"}, path)

    student.eval()  # BatchNorm statistics frozen (as distillation); nothing else depends on the mode
    bar = tqdm(total=cfg.steps, initial=start, desc="clicks", unit="step", disable=not cfg.progress)
    times, loss_value = [], float("nan")
    for step in range(start, cfg.steps):
        ts = time.time()
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * warm
        rng = np.random.default_rng([cfg.seed, 3, step])
        rows, boxes, crops = draw_batch(train, draws, rng, batch_size=cfg.batch_size, jitter_prob=0.0, size=size,
                                        jitter=(0, 0))
        b = assemble(train, rows, boxes, crops, tokens=tokens, size=size, crop_size=student.config.embedding_size,
                     clip_size=None, with_target=True, device=torch.device("cpu"))
        t_logits = torch.from_numpy(np.stack([np.asarray(teacher[ci][j], np.float32) for ci, j in rows]))[:, None]
        hw = [tuple(int(v) for v in train[ci].new_hw[int(train[ci].pos[j])]) for ci, j in rows]
        target = b.target.numpy()[:, 0]
        n = int(rng.integers(1, cfg.max_clicks + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            box_logits = decode(student, b, texts, dense)
            d_loss, _ = distill_loss(box_logits, t_logits)
            clicks: list[list[tuple[float, float, float]]] = [[] for _ in rows]
            prev = box_logits.detach().float().numpy()[:, 0]
            for r in range(n):
                for k in range(len(rows)):
                    c = grid_click(prev[k], target[k], hw[k])
                    if c is not None:
                        clicks[k].append(c)
                coords, labels = pad_clicks(clicks)
                if r < n - 1:
                    with torch.no_grad():
                        prev = decode(student, b, texts, dense, coords, labels).float().numpy()[:, 0]
            logits = decode(student, b, texts, dense, coords, labels).float()
        c_dice = dice_loss(logits, b.target)
        c_bce = F.binary_cross_entropy_with_logits(logits, b.target)
        loss = c_dice + c_bce + cfg.distill_weight * d_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        done = step + 1
        dt = time.time() - ts
        times.append(dt)
        log.write({"step": done, "loss": loss_value, "click_dice": float(c_dice.detach()),
                   "click_bce": float(c_bce.detach()), "distill": float(d_loss.detach()), "clicks": n,
                   "lr": optimizer.param_groups[-1]["lr"], "sec_per_step": dt})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", clicks=n)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save(last, done, loss_value)
    bar.close()
    if times:
        summary.setdefault("sec_per_step", []).append(float(np.mean(times)))
    save(final, cfg.steps, loss_value)
    save(last, cfg.steps, loss_value)
    return final
