"""Frozen CLIP (e.g. PubMedCLIP) from a local Hugging Face directory, and text-feature tables.

Nothing is downloaded: ``from_pretrained(dir, local_files_only=True)``. The official pipeline
feeds crops to CLIP without CLIP's mean/std normalisation (inference and training alike), so
neither do we.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcp_medsam.manifest import sha256_file
from mcp_medsam.modality import ACCEPTED, CATEGORIES, clip_text


class ClipError(RuntimeError):
    pass


def load_clip(path: str | Path) -> nn.Module:
    """A ``transformers.CLIPModel`` from a local directory, eval mode, no gradients."""
    from transformers import CLIPModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ClipError(f"{path}: not a Hugging Face model directory (no config.json)")
    model = CLIPModel.from_pretrained(str(path), local_files_only=True)
    model.requires_grad_(False)
    return model.eval()


def _pooled(out: object) -> torch.Tensor:
    # transformers 4.x returns the projected vector; 5.x an output object whose pooler_output it is.
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ClipError(f"unexpected CLIP output type {type(out).__name__}")
    return pooled


class ClipImageTower(nn.Module):
    """(B, 3, 224, 224) float32 crop in [0, 1] (no mean/std) -> (B, 512) projected image features."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)


@torch.no_grad()
def image_features(clip: nn.Module, crops_224: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) -> (B, 512) float32, in batches on the crops' device."""
    return _pooled(clip.get_image_features(pixel_values=crops_224)).float()


@torch.no_grad()
def text_features_from_clip(clip: nn.Module, path: str | Path, tokens: list[str]) -> np.ndarray:
    """(len(tokens), 512) float32 CLIP text features of "<token> Image" for each modality token.

    The tokenizer is read from the same directory (PubMedCLIP ships the CLIP ViT-B tokenizer,
    which has the vocabulary of the ``openai/clip-vit-base-patch16`` tokenizer the authors use).
    """
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ClipError(
            f"{path}: no CLIP tokenizer files (vocab.json, merges.txt); pass --text-features TABLE.npy instead"
        ) from exc
    ids = tok([clip_text(t) for t in tokens], max_length=tok.model_max_length, padding="max_length",
              truncation=True, return_tensors="pt").input_ids
    return _pooled(clip.get_text_features(input_ids=ids)).float().numpy()


def text_features_from_table(path: str | Path, tokens: list[str]) -> np.ndarray:
    """Rows of an (11, 512) table in the official category order, one per token (aliases share a row)."""
    table = np.load(path)
    if table.ndim != 2 or table.shape[0] != len(CATEGORIES):
        raise ClipError(f"{path}: expected a ({len(CATEGORIES)}, D) table in category order, got {table.shape}")
    return np.stack([table[ACCEPTED[t]] for t in tokens]).astype(np.float32)


def clip_weight_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of each weights file of a CLIP directory (``*.safetensors``, ``*.bin``), for the manifest."""
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    return {f.name: sha256_file(f) for f in files}
