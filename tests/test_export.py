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
    assert m["provenance"]["export_command"].startswith(f"mcp-medsam export --checkpoint {ckpt} --out")
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


def _zero_last_crop_conv(src, dst):
    """The checkpoint with its crop CNN's last conv weights zero (as the default model's): the crop
    CNN then outputs that conv's bias whatever the crop."""
    import re

    import torch

    ckpt = torch.load(src)
    last = max((k for k in ckpt["model"] if re.fullmatch(r"prompt_encoder\.crop_nets\.conv\d+\.weight", k)),
               key=lambda k: int(re.search(r"conv(\d+)", k).group(1)))
    ckpt["model"][last].zero_()
    torch.save(ckpt, dst)
    return dst


@pytest.mark.slow
def test_constant_crop_net_is_folded_and_live_one_kept(tmp_path, tiny_export):
    """A zero last crop conv: the export folds the crop CNN into a constant (no crops input, fewer
    FLOPs, the same masks as the unfolded graph); ``mcp-medsam fold`` does the same to a folder
    exported unfolded. A live crop CNN (the tiny random model) keeps it."""
    from mcp_medsam import Segmenter
    from mcp_medsam_torch.exporter import ExportConfig, export_model
    from mcp_medsam_torch.fold import fold_ir

    ckpt = _zero_last_crop_conv(tiny_checkpoint(tmp_path / "t.pth"), tmp_path / "z.pth")
    folded = export_model(ExportConfig(out=tmp_path / "folded", checkpoint=ckpt, keep_onnx=False))
    plain = export_model(ExportConfig(out=tmp_path / "plain", checkpoint=ckpt, keep_onnx=False, fold=False))
    dec = json.loads((folded / "manifest.json").read_text())["graphs"]["decoder"]
    ref = json.loads((plain / "manifest.json").read_text())["graphs"]["decoder"]
    assert "crops" in ref["inputs"] and "folded" not in ref
    assert "crops" not in dec["inputs"] and dec["folded"]["removed_inputs"] == ["crops"]
    assert dec["folded"]["crop_net"] == "constant dense embedding, last conv weight zero"
    assert dec["gflops_unfolded"] == ref["gflops"] and dec["gflops"] < 0.7 * ref["gflops"]
    assert dec["gflops"] == pytest.approx(ref["gflops"] - dec["folded"]["gflops_removed"], abs=2e-3)

    rng = np.random.default_rng(0)
    img = (rng.random((90, 70, 3)) * 255).astype(np.uint8)
    boxes = np.array([[5, 8, 50, 60], [20, 30, 69, 89], [0, 0, 69, 89]])
    segs = {}
    for name, folder in (("folded", folded), ("plain", plain)):
        seg = Segmenter.load(folder, cache_dir=tmp_path / "cache", precision="fp32")
        emb = seg.embed(img)
        segs[name] = seg.engine.decode(seg_feed(seg, emb, boxes))[0]
    assert seg.manifest.reads_crops and not Segmenter.load(folded, precision="fp32").manifest.reads_crops
    assert np.mean((segs["folded"] > 0) == (segs["plain"] > 0)) >= 0.999
    np.testing.assert_allclose(segs["folded"], segs["plain"], atol=1e-4)

    proc = run_cli("fold", str(plain))
    assert proc.returncode == 0 and "folded: " in proc.stdout and "inputs dropped: crops" in proc.stdout, proc.stderr
    again = json.loads((plain / "manifest.json").read_text())["graphs"]["decoder"]
    assert again["inputs"] == dec["inputs"] and again["gflops"] == dec["gflops"]
    assert again["folded"]["verification"]["sign_agreement"] >= 0.999
    assert run_cli("fold", str(plain)).stdout.startswith("nothing folded: already folded")

    live = tmp_path / "live"
    live.mkdir()
    for p in tiny_export.glob("decoder.*"):
        (live / p.name).write_bytes(p.read_bytes())
    result = fold_ir(live / "decoder.xml", compress_to_fp16=False)
    assert not result.folded and "nothing input-independent" in result.reason


def seg_feed(seg, emb, boxes):
    """The decoder feed the segmenter builds for boxes on one embedded image (crops only where read)."""
    from mcp_medsam import prompts

    h, w = emb.shape
    crops, _ = seg._content(emb.image, boxes)
    return prompts.decoder_feed(embeddings=emb.embedding, embedding_index=np.zeros(len(boxes), np.int64),
                                boxes=np.stack([prompts.box_to_grid(b, h, w, seg.manifest.image_size) for b in boxes]),
                                crops=crops, modality_index=np.zeros(len(boxes), np.int64))


def test_runtime_imports_openvino_without_its_converter_and_export_still_converts():
    """The runtime skips openvino.tools.ovc at import (cold start); convert_model, which the exporter
    calls, still resolves afterwards in the same process."""
    import subprocess
    import sys

    code = ("import sys; from mcp_medsam.engine import openvino_module; ov = openvino_module(); "
            "print('ovc' if 'openvino.tools.ovc' in sys.modules else 'no-ovc'); "
            "import openvino; print(callable(openvino.convert_model) and 'openvino.tools.ovc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["no-ovc", "True"]
