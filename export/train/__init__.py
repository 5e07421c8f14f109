"""Training and distillation of MCP-MedSAM (PyTorch side; the app never imports this package).

One module per concern:

- :mod:`.data`: case discovery (both CVPR24 layouts), the cached index, the split by case (torch-free);
- :mod:`.samplers`: modality / case / slice sampling (Algorithm 1) and the step-indexed batch sampler;
- :mod:`.augment`: preprocessing, flips, box jitter and crops of one sample;
- :mod:`.dataset`: sample id -> augmented sample;
- :mod:`.clip_features`: CLIP image features in the loop (optionally cached) and text features;
- :mod:`.losses`: Eq. 1 (Dice, BCE, IoU MSE, modality CE, contrastive) and the distillation loss;
- :mod:`.checkpointing`: initialisation, freezing, the one checkpoint write (atomic) and read (strict) path;
- :mod:`.evaluation`: the fixed held-out validation set and DSC per modality; distillation's agreement;
- :mod:`.distributed`: torchrun / DistributedDataParallel helpers;
- :mod:`.config`, :mod:`.csvlog`: what the two run configs share; the CSV logs of a run;
- :mod:`.loop`: :class:`TrainConfig` and :func:`run_training`;
- :mod:`.embedding_cache`, :mod:`.prompt_draws`, :mod:`.stage`: distillation's cache, prompt draws and
  optimisation stages;
- :mod:`.distill`: :class:`DistillConfig` and :func:`run_distillation` (the default-model recipe).

``python -m mcp_medsam_torch.train {train,distill} --help`` runs either from a shell (and under torchrun).
The names below are imported lazily, so importing the package costs nothing until they are used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DistillConfig", "TrainConfig", "run_distillation", "run_training"]


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig", "run_training"):
        from . import loop

        return getattr(loop, name)
    if name in ("DistillConfig", "run_distillation"):
        from . import distill

        return getattr(distill, name)
    raise AttributeError(name)
