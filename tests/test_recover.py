"""Recovering a checkpoint from an exported folder's per-box graph (mcp_medsam_torch.recover)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _moved(model, scale: float, seed: int, keep: tuple[str, ...] = ()):
    """Parameters (but those under ``keep``) moved by N(0, scale): no weight stays at an initial 0 or 1
    that a graph optimiser drops."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith(keep):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_recovered_model_gives_the_exported_outputs(tmp_path):
    """A tiny model, exported, then recovered from its IR with a reference whose weights differ by ~1e-4
    (as training moves them): the entries the graph holds come back, the decoder's outputs are the original's."""
    from mcp_medsam_torch.checkpoints import load_mcp_medsam
    from mcp_medsam_torch.exporter import ExportConfig, export_model
    from mcp_medsam_torch.model import build_mcp_medsam
    from mcp_medsam_torch.recover import recover_checkpoint

    torch.manual_seed(0)
    original = _moved(build_mcp_medsam("tiny"), 0.01, 1).eval()
    torch.save({"model": original.state_dict(), "config": {"variant": "tiny"}}, tmp_path / "a.pth")
    folder = export_model(ExportConfig(out=tmp_path / "w", checkpoint=tmp_path / "a.pth", keep_onnx=False))
    # The crop CNN is taken from the reference (frozen in the shipped recipe; in the graph only as a folded constant).
    reference = _moved(load_mcp_medsam(tmp_path / "a.pth")[0], 1e-4, 2, keep=("prompt_encoder.crop_nets.",))
    model, how = recover_checkpoint(folder, reference)
    got, want = model.state_dict(), original.state_dict()
    for k in ("mask_decoder.transformer.layers.0.self_attn.q_proj.weight", "mask_decoder.iou_token.weight",
              "prompt_encoder.point_embeddings.2.weight", "mask_decoder.transformer.norm_final_attn.bias",
              "mask_decoder.w_lin.weight", "prompt_encoder.point_embeddings.1.weight"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert "prompt_encoder.no_mask_embed.weight" in how.from_reference  # in no graph
    c, e = original.config.embed_dim, original.config.embedding_size
    g = torch.Generator().manual_seed(3)
    x = dict(image_embeddings=torch.randn(2, c, e, e, generator=g), boxes=torch.tensor([[4.0, 6, 40, 50]] * 2),
             crops=torch.rand(2, 3, e, e, generator=g), clip_image_features=torch.zeros(2, original.config.clip_dim),
             text_features=torch.zeros(2, original.config.clip_dim), category_idx=torch.tensor([0, 5]))
    with torch.no_grad():
        a, b = original.decode(**x), model.decode(**x)
    np.testing.assert_allclose(b.masks.numpy(), a.masks.numpy(), atol=1e-4)
    np.testing.assert_allclose(b.category.numpy(), a.category.numpy(), atol=1e-4)
