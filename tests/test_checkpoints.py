"""Strict, CPU-mapped checkpoint loading and the audited LiteMedSAM -> MCP-MedSAM conversion."""

from __future__ import annotations

import pytest
import torch

from conftest import GOLDEN, need, needs_litemedsam, tiny_checkpoint
from mcp_medsam_torch.checkpoints import (
    CheckpointError, checkpoint_variant, convert_state_dict, litemedsam_checkpoint_path, load_litemedsam,
    load_mcp_medsam, warm_start_from_litemedsam, warm_start_from_state,
)
from mcp_medsam_torch.model import build_litemedsam, build_mcp_medsam


def test_golden_checkpoint_loads_strictly_and_is_cast_to_float32():
    model, conv = load_mcp_medsam(need(GOLDEN / "mcp_medsam_golden.pth"))
    assert conv.cast_to_float32 > 400
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_plain_state_dict_and_ddp_prefix_load(tmp_path):
    torch.manual_seed(0)
    sd = build_mcp_medsam("tiny").state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    model, conv = load_mcp_medsam(tmp_path / "ddp.pth", variant="tiny")
    assert conv.stripped_prefix == "module."
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_missing_and_unexpected_keys_name_the_file(tmp_path):
    sd = build_mcp_medsam("tiny").state_dict()
    del sd["mask_decoder.w_lin.weight"]
    sd["mask_decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd, "config": {"variant": "tiny"}}, path)
    with pytest.raises(CheckpointError) as err:
        load_mcp_medsam(path)
    msg = str(err.value)
    assert str(path) in msg and "1 missing: mask_decoder.w_lin.weight" in msg
    assert "1 unexpected: mask_decoder.extra.weight" in msg


def test_wrong_shape_and_unreadable_files(tmp_path):
    sd = build_mcp_medsam("tiny").state_dict()
    sd["prompt_encoder.categories.weight"] = torch.zeros(12, 32)
    torch.save({"model": sd, "config": {"variant": "tiny"}}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="wrong shape: prompt_encoder.categories.weight"):
        load_mcp_medsam(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_mcp_medsam(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_mcp_medsam(tmp_path / "absent.pth")


def test_variant_recorded_in_our_checkpoints(tmp_path):
    path = tiny_checkpoint(tmp_path / "t.pth")
    assert checkpoint_variant(torch.load(path, weights_only=True)) == "tiny"
    assert checkpoint_variant({"model": {}}) == "mcp_medsam"
    model, _ = load_mcp_medsam(path)
    assert model.config.embed_dim == 32


@needs_litemedsam
def test_litemedsam_weights_are_located_and_checked():
    path = litemedsam_checkpoint_path()
    assert path.name == "lite_medsam.pth" and path.is_file()
    model = load_litemedsam()
    assert not model.training


def test_litemedsam_conversion_drops_only_the_mask_prompt_path():
    lite = build_litemedsam().state_dict()
    converted, conv = convert_state_dict(lite, source="litemedsam")
    assert len(conv.dropped) == 10 and all(k.startswith("prompt_encoder.mask_downscaling.") for k in conv.dropped)
    mcp = build_mcp_medsam().state_dict()
    assert set(converted) <= set(mcp) and len(converted) == 425


def test_warm_start_new_branches_pass_the_image_features_through():
    """Zero FiLM, zero last layers and the identity fuse conv: F4 fusion returns its input exactly."""
    torch.manual_seed(0)
    teacher = build_litemedsam("tiny")
    model, conv = warm_start_from_state(teacher.state_dict(), variant="tiny")
    dec = model.mask_decoder
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        fused = dec.fuse(x, torch.randn(2, 32, 16, 16), torch.randn(2, 32), torch.randn(2, 32))
    torch.testing.assert_close(fused, x)
    # Shared weights are LiteMedSAM's, bit for bit.
    for k, v in teacher.state_dict().items():
        if not k.startswith("prompt_encoder.mask_downscaling."):
            assert torch.equal(model.state_dict()[k], v), k
    # The crop CNN outputs LiteMedSAM's no-mask embedding, the extra tokens start at zero.
    with torch.no_grad():
        dense = model.prompt_encoder.crop_nets(torch.rand(1, 3, 16, 16))
        content = model.prompt_encoder.content_token(torch.zeros(1, 32))
        modality = model.prompt_encoder.modality_token(torch.randn(1, 32), torch.tensor([3]))
    torch.testing.assert_close(dense, teacher.prompt_encoder.no_mask_dense(1))
    assert content.abs().max() == 0 and modality.abs().max() == 0


@needs_litemedsam
def test_warm_start_from_the_real_litemedsam_weights():
    model, conv, sha = warm_start_from_litemedsam()
    assert sha == "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    assert len(conv.dropped) == 10
    lite = load_litemedsam()
    img = torch.rand(1, 3, 256, 256)
    boxes = torch.tensor([[40.0, 50.0, 160.0, 170.0]])
    with torch.no_grad():
        emb = lite.image_encoder(img)
        a = lite.decode(image_embeddings=emb, boxes=boxes).masks
        b = model.decode(image_embeddings=emb, boxes=boxes, crops=torch.rand(1, 3, 64, 64),
                         clip_image_features=torch.zeros(1, 512), text_features=torch.zeros(1, 512),
                         category_idx=torch.tensor([0])).masks
    # Only the two extra (zero) tokens in the attention differ: close to, not equal to, LiteMedSAM.
    assert 0 < float((a - b).norm() / a.norm()) < 0.2
