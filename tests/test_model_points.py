"""Click prompts in the model: SAM's point tokens (positional encoding + a learned embedding per label)
appended after MCP-MedSAM's four tokens, padding masked out of attention, and the exported per-box
graph's ``point_coords`` / ``point_labels`` inputs against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_checkpoint

TOL = dict(rtol=1e-4, atol=1e-4)  # tests/test_model_golden.py's tolerance


def _golden_inputs(module_io):
    t = {k: torch.from_numpy(v) for k, v in module_io.items()}
    return dict(image_embeddings=t["image_embedding"].expand(3, -1, -1, -1), boxes=t["boxes_256"][:, 0],
                crops=t["crops_64"], clip_image_features=t["clip_image_features"], text_features=t["text_features"],
                category_idx=t["category_idx"])


def test_padding_points_give_the_golden_box_only_outputs(golden_model, module_io):
    """Stored reference: the official box-only outputs (module_io.npz); any number of padding points
    (label -1, at any place) leaves them as they are."""
    inputs = _golden_inputs(module_io)
    coords = torch.tensor([[[10.0, 20.0], [200.0, 3.0], [0.0, 0.0]]]).expand(3, -1, -1)
    with torch.no_grad():
        out = golden_model.decode(**inputs, point_coords=coords, point_labels=-torch.ones(3, 3))
    for ours, key in ((out.masks, "low_res_masks"), (out.iou, "iou_pred"), (out.category, "category_pred")):
        np.testing.assert_allclose(ours.numpy(), module_io[key], **TOL)


def _tiny():
    from mcp_medsam_torch.model import build_mcp_medsam

    torch.manual_seed(0)
    model = build_mcp_medsam("tiny").eval()
    c, e, s = model.config.embed_dim, model.config.embedding_size, model.config.image_size
    g = torch.Generator().manual_seed(1)
    inputs = dict(image_embeddings=torch.randn(2, c, e, e, generator=g), boxes=torch.tensor([[5.0, 8, 40, 50]] * 2),
                  crops=torch.rand(2, 3, e, e, generator=g), clip_image_features=torch.zeros(2, model.config.clip_dim),
                  text_features=torch.zeros(2, model.config.clip_dim), category_idx=torch.tensor([0, 3]))
    return model, inputs, s


@torch.no_grad()
def test_clicks_change_the_mask_and_padding_does_not():
    model, inputs, s = _tiny()
    box_only = model.decode(**inputs).masks
    one = model.decode(**inputs, point_coords=torch.tensor([[[20.0, 30.0]]] * 2),
                       point_labels=torch.tensor([[1.0]] * 2)).masks
    padded = model.decode(**inputs, point_coords=torch.tensor([[[20.0, 30.0], [3.0, 60.0], [0.0, 0.0]]] * 2),
                          point_labels=torch.tensor([[1.0, -1.0, -1.0]] * 2)).masks
    background = model.decode(**inputs, point_coords=torch.tensor([[[20.0, 30.0]]] * 2),
                              point_labels=torch.tensor([[0.0]] * 2)).masks
    assert (one - box_only).abs().max() > 1e-3  # a click is a prompt
    assert (background - one).abs().max() > 1e-3  # its label matters
    np.testing.assert_allclose(padded.numpy(), one.numpy(), rtol=1e-5, atol=1e-5)  # padding is no prompt


@torch.no_grad()
def test_point_token_is_sams():
    """PE of the pixel centre ((c + 0.5) / S) plus point_embeddings[1] (fg) / [0] (bg); padding:
    not_a_point_embed with zero positional encoding."""
    model, _, s = _tiny()
    pe = model.prompt_encoder
    coords = torch.tensor([[[3.0, 7.0], [10.0, 2.0], [5.0, 5.0]]])
    tokens, bias = pe.point_tokens(coords, torch.tensor([[1.0, 0.0, -1.0]]))
    enc = pe.pe_layer((coords + 0.5) / s)[0]
    torch.testing.assert_close(tokens[0, 0], enc[0] + pe.point_embeddings[1].weight[0])
    torch.testing.assert_close(tokens[0, 1], enc[1] + pe.point_embeddings[0].weight[0])
    torch.testing.assert_close(tokens[0, 2], pe.not_a_point_embed.weight[0])
    assert bias[0, :2].tolist() == [0.0, 0.0] and bias[0, 2] < -1e3


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_export):
    """The exported tiny model (tests/conftest.py) and the PyTorch per-box graph it came from."""
    from mcp_medsam.engine import Engine
    from mcp_medsam.manifest import load_manifest
    from mcp_medsam_torch.checkpoints import load_mcp_medsam
    from mcp_medsam_torch.exporter import modality_token_table
    from mcp_medsam_torch.wrappers import DecoderGraph

    manifest = load_manifest(tiny_export)
    model, _ = load_mcp_medsam(tiny_checkpoint(tmp_path_factory.mktemp("pts") / "tiny.pth"))
    table = modality_token_table(model, np.zeros((len(manifest.modality_tokens), model.config.clip_dim), np.float32),
                                 list(manifest.modality_tokens))
    graph = DecoderGraph(model, modality_tokens=table, with_clip=False).eval()
    return Engine(manifest, backend="openvino"), graph, manifest


def _feed(manifest, rng, p: int) -> dict[str, np.ndarray]:
    s, e, c = manifest.image_size, manifest.embedding_size, manifest.embed_dim
    b = 3
    labels = rng.integers(-1, 2, (b, p)).astype(np.float32)
    labels[:, 0] = 1.0
    feed = {"image_embeddings": rng.normal(0, 0.5, (2, c, e, e)).astype(np.float32),
            "embedding_index": np.array([0, 1, 1]),
            "boxes": np.array([[4, 6, 40, 50], [0, 0, 63, 63], [20, 20, 30, 28]], np.float32),
            "crops": rng.random((b, 3, e, e), dtype=np.float32), "modality_index": np.array([0, 2, 5]),
            "point_coords": rng.uniform(0, s - 1, (b, p, 2)).astype(np.float32), "point_labels": labels}
    return {k: v for k, v in feed.items() if k in manifest.graphs["decoder"].inputs or k == "boxes"}


@pytest.mark.parametrize("p", [1, 4])
def test_exported_clicks_match_pytorch(tiny_pair, p):
    engine, graph, manifest = tiny_pair
    feed = _feed(manifest, np.random.default_rng(p), p)
    got = engine.decode(feed)[0]
    full = {**feed, "crops": feed.get("crops", np.zeros((3, 3, manifest.crop_size, manifest.crop_size), np.float32))}
    names = ("image_embeddings", "embedding_index", "boxes", "crops", "modality_index", "point_coords", "point_labels")
    with torch.no_grad():
        ref = graph(*[torch.from_numpy(np.asarray(full[k])) for k in names])[0][:, 0].numpy()
    assert np.mean((ref > 0) == (got > 0)) >= 0.999  # the export's decoder bar (mcp_medsam_torch.verify.BARS)
    np.testing.assert_allclose(got, ref, atol=1e-3 * max(1.0, float(np.abs(ref).max())))


def test_exported_padding_points_are_no_prompt(tiny_pair):
    """A box-only feed (the engine adds one padding point) and three padding points anywhere agree."""
    engine, _, manifest = tiny_pair
    feed = _feed(manifest, np.random.default_rng(0), 3)
    box_only = {k: v for k, v in feed.items() if not k.startswith("point_")}
    padded = {**feed, "point_labels": np.full_like(feed["point_labels"], -1.0)}
    clicked = engine.decode(feed)[0]
    ref = engine.decode(box_only)[0]
    np.testing.assert_allclose(engine.decode(padded)[0], ref, rtol=1e-5, atol=1e-5)
    assert np.abs(clicked - ref).max() > 1e-3
