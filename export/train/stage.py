"""Distillation stages 2 and 3: the optimisation loop of one stage.

``distill``: teacher targets (BCE + soft Dice to the teacher's probabilities); ``finetune``: labels
and loss Eq. 1. Each stage resumes from the newer of its ``<stage>_last.pth`` / final checkpoint
(one read path: :func:`~.checkpointing.restore`), with the learning rate a function of the step
alone (linear warm-up), so a resumed stage continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from mcp_medsam.io.atomic import write_json
from mcp_medsam_torch.checkpoints import read_checkpoint
from mcp_medsam_torch.model import LiteMedSAM, MCPMedSAM

from .checkpointing import PRETRAINED_PREFIXES, atomic_save, restore, set_trainable
from .clip_features import ClipFeatures
from .config import plain
from .csvlog import CsvLog
from .embedding_cache import CachedCase
from .losses import LossWeights, distill_loss, mcp_loss
from .prompt_draws import PromptDraws, assemble, draw_batch

if TYPE_CHECKING:
    from .distill import DistillConfig


def param_groups(model: MCPMedSAM, lr: float, scale: float) -> list[dict]:
    pre, new = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (pre if n.startswith(PRETRAINED_PREFIXES) else new).append(p)
    groups = [{"params": new, "lr": lr, "base_lr": lr, "name": "new"}]
    if pre:
        groups.append({"params": pre, "lr": lr * scale, "base_lr": lr * scale, "name": "pretrained"})
    return [g for g in groups if g["params"]]


def run_stage(cfg: DistillConfig, stage: str, *, student: MCPMedSAM, teacher: LiteMedSAM, train: list[CachedCase],
              tokens: tuple[str, ...], clip: ClipFeatures, texts: torch.Tensor, device: torch.device, steps: int,
              lr: float, evaluate: Callable[[str, int], dict[str, Any]], step_log: CsvLog, summary: dict[str, Any],
              summary_path: Path) -> Path:
    """One optimisation stage ("distill": teacher targets; "finetune": labels and Eq. 1); returns its
    final checkpoint. ``evaluate(stage, step)`` judges the student on held-out cases."""
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    last, final = out / f"{stage}_last.pth", out / ("distilled.pth" if stage == "distill" else "finetuned.pth")
    mc = student.config
    stage_id = 1 if stage == "distill" else 2
    set_trainable(student, freeze_prefixes=("image_encoder",)
                  + (cfg.freeze_prefixes if stage == "distill" else cfg.finetune_freeze_prefixes))
    optimizer = torch.optim.AdamW(param_groups(student, lr, cfg.pretrained_lr_scale), betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    start = 0
    for path in (last, final):  # the newer of the two holds the latest state of this stage
        if path.is_file():
            ck = read_checkpoint(path)
            if start < int(ck.get("step", 0)):
                start = restore(student, ck, path, optimizer)
    distilled = out / "distilled.pth"
    if start == 0 and stage == "finetune" and distilled.is_file():
        restore(student, read_checkpoint(distilled), distilled)
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
        rows, boxes, crops = draw_batch(train, draws, rng, batch_size=cfg.batch_size, jitter_prob=cfg.jitter_prob,
                                        size=mc.image_size, jitter=jitter)
        b = assemble(train, rows, boxes, crops, tokens=tokens, size=mc.image_size, crop_size=mc.embedding_size,
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
            write_json(summary_path, summary)
    bar.close()
    elapsed = time.time() - t_stage
    if steps > start:
        summary.setdefault("timings_s", {})[stage] = elapsed
        summary.setdefault("steps_per_s", {})[stage] = (steps - start) / elapsed
    save(final, steps, loss_value)
    save(last, steps, loss_value)
    summary[f"after_{stage}"] = evaluate(stage, steps)
    write_json(summary_path, summary)
    return final
