"""Export: ONNX + OpenVINO IR + manifest, verified against PyTorch in the same command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, tiny_checkpoint


def test_manifest_describes_the_folder(tiny_export):
    m = json.loads((tiny_export / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["variant"] == "tiny" and m["precision"] == "fp32"
    assert set(m["graphs"]) == {"image_encoder", "decoder"}  # no CLIP tower
    dec = m["graphs"]["decoder"]
    assert list(dec["inputs"]) == ["image_embeddings", "embedding_index", "boxes", "crops", "modality_index",
                                   "point_coords", "point_labels"]
    assert dec["inputs"]["point_coords"] == {"shape": ["B", "P", 2], "dtype": "float32"}
    assert dec["inputs"]["point_labels"] == {"shape": ["B", "P"], "dtype": "float32"}
    assert m["prompts"] == {"points": True, "mask": False}
    assert dec["inputs"]["image_embeddings"]["shape"] == ["E", 32, 16, 16]
    assert dec["inputs"]["crops"]["shape"] == ["B", 3, 16, 16]
    assert list(dec["outputs"]) == ["low_res_logits", "iou", "category_logits"]
    for g in m["graphs"].values():
        assert g["gflops"] > 0
        for f in g["files"].values():
            assert (tiny_export / f).is_file()
    assert m["preprocessing"]["image_size"] == 64 and m["preprocessing"]["crop_size"] == 16
    assert "XRay" in m["modalities"]["tokens"] and "X-Ray" in m["modalities"]["tokens"]
    assert m["modalities"]["category_index"]["Mammo"] == 6
    assert m["source"]["kind"] == "mcp-medsam-checkpoint" and len(m["source"]["sha256"]) == 64
    ver = m["verification"]["decoder"]
    assert ver["openvino"]["sign_agreement"] >= 0.999 and ver["onnxruntime"]["sign_agreement"] >= 0.999


def test_runtime_reads_the_manifest(tiny_export):
    from mcp_medsam.manifest import load_manifest

    m = load_manifest(tiny_export)
    assert (m.image_size, m.embedding_size, m.crop_size, m.embed_dim) == (64, 16, 16, 32)
    assert m.modality_row("Microscope") == m.modality_tokens.index("Microscope")
    assert not m.has_clip


def test_every_graph_is_verified_against_its_bar(tiny_export):
    from mcp_medsam_torch.verify import BARS

    ver = json.loads((tiny_export / "manifest.json").read_text())["verification"]
    assert set(ver) == {"image_encoder", "decoder"}
    for graph, backends in ver.items():
        assert set(backends) == {"openvino", "onnxruntime"}
        for fig in backends.values():
            bar = BARS[(graph, "fp32")]
            assert fig["bar"] == str(bar) and bar.met(fig[bar.metric])
    assert ver["image_encoder"]["openvino"]["rel_max_diff"] <= 1e-4


def _broken_engine(monkeypatch, graph: str, shift: float) -> list:
    """The runtime engine as verification gets it, with one graph's outputs shifted; records what it loaded."""
    import mcp_medsam_torch.verify as verify

    loaded = []

    class Broken(verify.Engine):
        def __init__(self, manifest, **kw):
            super().__init__(manifest, **kw)
            loaded.append((manifest.folder, self.backend))

        def encode(self, images):
            out = super().encode(images)
            return out + shift if graph == "image_encoder" else out

        def decode(self, feed):
            logits, iou, cat = super().decode(feed)
            return (logits + shift if graph == "decoder" else logits), iou, cat

    monkeypatch.setattr(verify, "Engine", Broken)
    return loaded


@pytest.mark.parametrize("graph, message", [("decoder", "decoder/openvino: mask agreement"),
                                            ("image_encoder", "image_encoder/openvino: rel_max_diff")])
def test_failed_verification_writes_nothing(tmp_path, monkeypatch, graph, message):
    import mcp_medsam_torch.exporter as ex

    loaded = _broken_engine(monkeypatch, graph, 1.0)  # every logit / feature shifted: masks disagree
    out = tmp_path / "w"
    with pytest.raises(ex.ExportError, match=message) as err:
        ex.export_model(ex.ExportConfig(out=out, checkpoint=tiny_checkpoint(tmp_path / "t.pth")))
    assert not out.exists() and not list(tmp_path.glob(".w.tmp-*"))
    # Verification read the folder it had written (its temporary name), through both backends.
    assert [b for _, b in loaded] == ["openvino", "onnxruntime"]
    assert loaded[0][0].name.startswith(".w.tmp-")
    assert "onnxruntime" in str(err.value)  # every failure is named, not only the first


def test_cli_export_fp16_without_onnx(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "t.pth", seed=1)
    proc = run_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "w16"), "--precision", "fp16",
                   "--no-onnx")
    assert proc.returncode == 0, proc.stderr
    assert "max|diff|" in proc.stdout and "decoder" in proc.stdout
    m = json.loads((tmp_path / "w16" / "manifest.json").read_text())
    assert m["precision"] == "fp16"
    assert all(set(g["files"]) == {"openvino"} for g in m["graphs"].values())
    assert not list((tmp_path / "w16").glob("*.onnx"))
    cases = tmp_path / "in"
    cases.mkdir()
    np.savez(cases / "2DBox_CT_a.npz", imgs=np.zeros((30, 30, 3), np.uint8), boxes=np.array([[2, 2, 20, 20]]))
    proc = run_cli("predict", "-i", str(cases), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "w16"),
                   "--backend", "onnxruntime")
    assert proc.returncode == 1 and "no onnx file for graph" in proc.stderr


def test_unknown_precision_is_refused(tmp_path):
    proc = run_cli("export", "--out", str(tmp_path / "x"), "--precision", "bf16")
    assert proc.returncode == 1 and "unknown precision 'bf16'" in proc.stderr
