"""Module-level golden parity: our PyTorch modules with the official-layout golden checkpoint
reproduce the official modules' outputs stored in module_io.npz.

Tolerance: rtol = atol = 1e-4. The reference README measures float32 thread-count noise of ~2e-6
on the embedding and ~3.4e-5 on logits of size ~50; we see <= 6e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, need

TOL = dict(rtol=1e-4, atol=1e-4)


def test_state_dict_layout_matches_the_official_manifest():
    from mcp_medsam_torch.model import build_litemedsam, build_mcp_medsam

    ref = json.loads(need(SHARED / "reference" / "mcp_medsam_state_dict.json").read_text())
    for model, key in ((build_mcp_medsam(), "mcp_medsam"), (build_litemedsam(), "lite_medsam")):
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: v["shape"] for k, v in ref[key]["state_dict"].items()}
        assert ours == theirs, key
    assert len(ours) == ref["lite_medsam"]["num_keys"]


@pytest.fixture(scope="module")
def outputs(golden_model, module_io):
    t = {k: torch.from_numpy(v) for k, v in module_io.items()}
    m = golden_model
    with torch.no_grad():
        emb = m.image_encoder(t["image"])
        sparse, dense = m.prompt_encoder(boxes=t["boxes_256"][:, 0], crops=t["crops_64"],
                                         clip_image_features=t["clip_image_features"],
                                         text_features=t["text_features"], category_idx=t["category_idx"])
        out = m.decode(image_embeddings=emb.expand(3, -1, -1, -1), boxes=t["boxes_256"][:, 0], crops=t["crops_64"],
                       clip_image_features=t["clip_image_features"], text_features=t["text_features"],
                       category_idx=t["category_idx"])
        per_box = torch.cat([
            m.decode(image_embeddings=emb, boxes=t["boxes_256"][i:i + 1, 0], crops=t["crops_64"][i:i + 1],
                     clip_image_features=t["clip_image_features"][i:i + 1], text_features=t["text_features"][i:i + 1],
                     category_idx=t["category_idx"][i:i + 1]).masks for i in range(3)])
    return {"image_embedding": emb, "sparse_embeddings": sparse, "dense_embeddings": dense,
            "low_res_masks": out.masks, "iou_pred": out.iou, "category_pred": out.category,
            "low_res_masks_per_box": per_box}


@pytest.mark.parametrize("key", ["image_embedding", "sparse_embeddings", "dense_embeddings", "low_res_masks",
                                 "iou_pred", "category_pred", "low_res_masks_per_box"])
def test_golden_module_outputs(outputs, module_io, key):
    np.testing.assert_allclose(outputs[key].numpy(), module_io[key], **TOL)


def test_golden_masks_agree_in_sign(outputs, module_io):
    assert np.mean((outputs["low_res_masks"].numpy() > 0) == (module_io["low_res_masks"] > 0)) > 0.9999


def test_dense_positional_encoding_is_sams(golden_model):
    pe = golden_model.prompt_encoder.get_dense_pe()
    assert pe.shape == (1, 256, 64, 64)
    g = golden_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    # Pixel (row 0, col 1): centre (1.5/64, 0.5/64) in (x, y), SAM's formula written out.
    c = torch.tensor([1.5 / 64, 0.5 / 64]) * 2 - 1
    proj = 2 * torch.pi * (c @ g)
    np.testing.assert_allclose(pe[0, :, 0, 1].numpy(), torch.cat([proj.sin(), proj.cos()]).numpy(), atol=1e-6)
