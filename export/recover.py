"""Recover an MCP-MedSAM checkpoint from an exported folder's per-box graph (the OpenVINO IR).

Why: the bundled default's checkpoint (``runs/distill-all/distilled.pth``) was never kept, and the
click fine-tune (issue 24) must start from the exact box-only model it keeps. Everything the graph
computes is in the IR as constants; what the graph does not hold comes from a ``reference`` model that
the exported one was trained from (for the bundled weights: the LiteMedSAM warm start, whose image
encoder and crop CNN distillation kept frozen).

How, per state_dict entry of the prompt encoder and mask decoder:

1. constants that keep their PyTorch names (convolutions, 2D linear layers) by name;
2. ``iou_token`` / ``mask_tokens``: the (1, 5, C) output-token constant;
3. every other entry: the graph constant of the same size (as is or transposed) nearest to the
   reference's value, accepted within ``2e-3 + 2e-3 * max|ref|`` (training moved them less; float16
   storage rounds them by ~5e-4 relative); entries the graph does not use (SAM's point embeddings, the
   hypernetworks of mask tokens 1-3) keep the reference's value;
4. F4 residual blocks: conv1 and its BatchNorm are one merged conv in the graph: conv1 gets the merged
   weight, the BatchNorm becomes ``x + bias`` (weight 1, mean 0, var 1 - eps, bias the merged bias);
5. the content token (a constant without CLIP) and the modality token table: through their MLPs
   exactly: ``clip_img_mlp`` outputs its fc2 bias for zero features; ``mlps`` passes the category
   embedding through (fc1 = [I; -I], fc2 = [I, -I]: gelu(z) - gelu(-z) = z), whose rows are the table's.

The result gives the graph's outputs (box-only: measured per-box mask Dice 0.9998 against the bundled
fp16 IR): check the outputs (``mcp-medsam train-clicks`` judges the box-only agreement with the folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcp_medsam.modality import ACCEPTED
from mcp_medsam.manifest import load_manifest

from .model import MCPMedSAM

# Constants of the per-box graph that are no state_dict entry (or are handled apart).
_SPECIAL = ("constant_content", "modality_tokens", "dense_pe")
# Entries never in the per-box graph: kept from the reference.
_FROM_REFERENCE = ("image_encoder.", "prompt_encoder.crop_nets.", "prompt_encoder.pe_layer.")
_THROUGH_MLPS = ("prompt_encoder.categories.", "prompt_encoder.mlps.", "prompt_encoder.clip_text_mlp.",
                 "prompt_encoder.clip_img_mlp.")
_F4_BLOCKS = ("m_conv", "convs", "c_conv")  # in graph order


class RecoverError(RuntimeError):
    pass


@dataclass
class Recovery:
    """What :func:`recover_checkpoint` did: how each entry was found, and the entries kept from the reference."""

    how: dict[str, str] = field(default_factory=dict)
    from_reference: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # graph constants of no entry (crop CNN, PE matrix)


def _constants(xml: Path) -> tuple[list[tuple[str, np.ndarray]], dict[str, str]]:
    """The graph's constants in graph order (name without ``_compressed``, float32 value), and for each
    convolution weight the name of the constant added to that convolution's output (its bias)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))

    def source(value):  # the constant behind Convert / Reshape / Unsqueeze chains, else None
        node = value.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Unsqueeze") and node.get_input_size():
            node = node.input_value(0).get_node()
        return node if node.get_type_name() == "Constant" else None

    name = lambda op: op.get_friendly_name().removesuffix("_compressed")  # noqa: E731
    biases = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution" or source(op.input_value(1)) is None:
            continue
        for target in op.output(0).get_target_inputs():
            add = target.get_node()
            if add.get_type_name() == "Add":
                b = [source(add.input_value(k)) for k in range(2)]
                b = [x for x in b if x is not None]
                if b:
                    biases[name(source(op.input_value(1)))] = name(b[0])
    consts = [(name(op), np.array(op.get_data()).astype(np.float32)) for op in model.get_ordered_ops()
              if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real()]  # not shapes
    return consts, biases


@torch.no_grad()
def recover_checkpoint(folder: Path, reference: MCPMedSAM) -> tuple[MCPMedSAM, Recovery]:
    """The model whose per-box graph ``folder`` holds (``reference`` is changed in place and returned)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.has_clip:
        raise RecoverError(f"{folder}: a model with a CLIP tower (its content token is not a constant)")
    consts, conv_bias = _constants(manifest.graph_file("decoder", "openvino"))
    index_of = {n: i for i, (n, _) in enumerate(consts)}
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    rec = Recovery()
    c = reference.config.embed_dim
    used = {i for i, (n, _) in enumerate(consts) if n in _SPECIAL}
    merged = [i for i, (n, v) in enumerate(consts) if n.startswith("onnx::Conv") and v.shape == (c, c, 3, 3)]
    if len(merged) < 3:
        raise RecoverError(f"{folder}: expected the 3 merged conv1+BatchNorm of the F4 blocks, found {len(merged)}")
    for blk, i in zip(_F4_BLOCKS, merged[-3:]):
        j = index_of.get(conv_bias.get(consts[i][0], ""))
        if j is not None and consts[j][1].size != c:
            raise RecoverError(f"{folder}: the bias of the merged conv of {blk} ({consts[i][0]}) is not ({c},)")
        bias = consts[j][1] if j is not None else np.zeros(c, np.float32)  # a zero bias is left out of the graph
        p, eps = f"mask_decoder.{blk}", getattr(reference.mask_decoder, blk).batch_norm1.eps
        sd[f"{p}.conv1.weight"] = torch.from_numpy(consts[i][1].copy())
        sd[f"{p}.batch_norm1.weight"] = torch.ones(c)
        sd[f"{p}.batch_norm1.bias"] = torch.from_numpy(bias.reshape(c).copy())
        sd[f"{p}.batch_norm1.running_mean"] = torch.zeros(c)
        sd[f"{p}.batch_norm1.running_var"] = torch.full((c,), 1.0 - eps)
        for k in ("conv1.weight", "batch_norm1.weight", "batch_norm1.bias", "batch_norm1.running_mean",
                  "batch_norm1.running_var"):
            rec.how[f"{p}.{k}"] = f"merged {consts[i][0]}"
        used.update({i} if j is None else {i, j})
    tokens = [(i, v) for i, (_, v) in enumerate(consts) if v.shape == (1, 5, c)]
    if len(tokens) != 1:
        raise RecoverError(f"{folder}: expected one (1, 5, {c}) output-token constant, found {len(tokens)}")
    sd["mask_decoder.iou_token.weight"] = torch.from_numpy(tokens[0][1][0, :1].copy())
    sd["mask_decoder.mask_tokens.weight"] = torch.from_numpy(tokens[0][1][0, 1:].copy())
    rec.how["mask_decoder.iou_token.weight"] = rec.how["mask_decoder.mask_tokens.weight"] = "output tokens"
    used.add(tokens[0][0])
    by_name = {n: i for i, (n, _) in enumerate(consts)}
    pending = []
    for k, t in sd.items():
        if k in rec.how or k.startswith(_FROM_REFERENCE + _THROUGH_MLPS) or k.endswith("num_batches_tracked"):
            continue
        i = by_name.get(k)
        if i is not None and consts[i][1].size == t.numel() and i not in used:
            sd[k] = torch.from_numpy(consts[i][1].reshape(t.shape).copy())
            rec.how[k] = "name"
            used.add(i)
        else:
            pending.append(k)
    for k in pending:
        ref = sd[k].numpy().astype(np.float32)
        best = None
        for i, (n, v) in enumerate(consts):
            if i in used or v.size != ref.size:
                continue
            for cand in [v.reshape(ref.shape)] + ([v.reshape(ref.shape[::-1]).T] if ref.ndim == 2 else []):
                d = float(np.abs(cand - ref).max())
                if best is None or d < best[0]:
                    best = (d, i, n, cand)
        if best is None or best[0] > 2e-3 + 2e-3 * float(np.abs(ref).max()):
            rec.from_reference.append(k)
            continue
        sd[k] = torch.from_numpy(np.ascontiguousarray(best[3]))
        rec.how[k] = f"nearest {best[2]} ({best[0]:.1e})"
        used.add(best[1])
    # Content and modality tokens through their MLPs (module doc, step 5).
    named = {n: v for n, v in consts}
    for key in ("constant_content", "modality_tokens"):
        if key not in named:
            raise RecoverError(f"{folder}: no {key} constant in the per-box graph")
    sd["prompt_encoder.clip_img_mlp.fc1.bias"].zero_()
    sd["prompt_encoder.clip_img_mlp.fc2.bias"] = torch.from_numpy(named["constant_content"].reshape(c).copy())
    for k in [k for k in sd if k.startswith("prompt_encoder.clip_text_mlp.")]:
        sd[k].zero_()
    eye = torch.eye(c)
    sd["prompt_encoder.mlps.fc1.weight"] = torch.cat([torch.cat([torch.zeros(c, c), eye], 1),
                                                      torch.cat([torch.zeros(c, c), -eye], 1)])
    sd["prompt_encoder.mlps.fc1.bias"] = torch.zeros(2 * c)
    sd["prompt_encoder.mlps.fc2.weight"] = torch.cat([eye, -eye], 1)
    sd["prompt_encoder.mlps.fc2.bias"] = torch.zeros(c)
    table = named["modality_tokens"]
    for row, token in enumerate(manifest.modality_tokens):
        sd["prompt_encoder.categories.weight"][ACCEPTED[token]] = torch.from_numpy(table[row])
    for k in sd:
        if k.startswith(_THROUGH_MLPS):
            rec.how[k] = "through the MLPs"
    # What is left: the crop CNN (kept from the reference, or folded), the positional-encoding matrix.
    rec.unused = [consts[i][0] for i in range(len(consts)) if i not in used and consts[i][1].size >= c]
    reference.load_state_dict(sd, strict=True)
    return reference.eval(), rec

