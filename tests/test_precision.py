"""Faster precisions (issue 13): layer groups and the graph split, INT8 and bf16 variants written into
a model folder, the precision chosen per CPU at run time, the --precision option, bench per precision.

The bf16 tests skip where OpenVINO reports no bf16 support; the INT8 ones run on every CPU (explicit
``--precision int8`` runs anywhere; ``auto`` only picks INT8 with VNNI)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, need, run_cli
from mcp_medsam import Segmenter, prompts
from mcp_medsam.engine import CpuFeatures, EngineError, content_key, cpu_features, resolve_precision
from mcp_medsam.errors import ManifestError, ModelError
from mcp_medsam.manifest import SegmentSpec, VariantSpec, load_manifest

needs_bf16 = pytest.mark.skipif(not cpu_features().has("BF16"),
                                reason="OpenVINO reports no bf16 support on this CPU (a bf16 hint would be emulated)")

# Small held-out set: 2 calibration cases, 4 judged (2D and 3D), ground truth beside them.
CASES = ["2DBox_Endoscopy_KvasirSEG_cju0qx73cjw570799j4n5cjze.npz", "2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz",
         "2DBox_XRay_Shenzhen_CHNCXR-0004-0.npz", "3DBox_MR_pyradiomics_brain1.npz", "3DBox_PET_STS_STS-002.npz",
         "2DBox_Endoscopy_KvasirSEG_cju0roawvklrq0799vmjorwfv.npz"]


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for sub in ("imgs", "gts"):
        (root / sub).mkdir()
        for name in CASES:
            (root / sub / name).symlink_to(need(SAMPLE / sub / name))
    return root / "imgs"


@pytest.fixture(scope="module")
def int8_folder(tiny_export, data, tmp_path_factory) -> tuple[Path, object]:
    """The tiny model with an INT8 variant written by the real tool (the closest mix kept: a random tiny
    model need not hold the bars, and the runtime path is what is tested here)."""
    from mcp_medsam_torch.precision import VariantConfig, build_variants

    folder = tmp_path_factory.mktemp("int8") / "w"
    shutil.copytree(tiny_export, folder)
    report = build_variants(folder, VariantConfig(data=data, precisions=("int8",), calibration_cases=2,
                                                  study_slices=2, chain_slices=4, max_candidates=1,
                                                  keep_unvalidated=True))
    return folder, report


def _fake(manifest, **variants: bool):
    """The manifest with variants ``name=validated`` (files are not read by resolve_precision)."""
    seg = (SegmentSpec("decoder.xml", "bf16", ("a",), ("b",)),)
    return dataclasses.replace(manifest, variants={
        name: VariantSpec(name, ("BF16",) if name == "bf16" else ("VNNI",), {"decoder": seg}, ok, {})
        for name, ok in variants.items()})


def test_auto_runs_the_fastest_validated_variant_this_cpu_supports(tiny_export):
    m = load_manifest(tiny_export)
    plain = CpuFeatures("cascade", frozenset({"FP32", "INT8"}), frozenset({"avx512f"}))
    vnni = CpuFeatures("cascade", frozenset({"FP32", "INT8"}), frozenset({"avx512f", "avx512_vnni"}))
    bf16 = CpuFeatures("epyc", frozenset({"FP32", "INT8", "BF16"}), frozenset({"avx512_bf16", "avx512_vnni"}))
    both = _fake(m, bf16=True, int8=True)
    assert resolve_precision(m, "auto", cpu=bf16)[0] == "fp32"  # no variants at all
    assert resolve_precision(both, "auto", cpu=plain)[0] == "fp32"
    assert resolve_precision(both, "auto", cpu=vnni)[0] == "int8"
    assert resolve_precision(both, "auto", cpu=bf16)[0] == "bf16"
    assert resolve_precision(_fake(m, bf16=False, int8=True), "auto", cpu=bf16)[0] == "int8"  # unvalidated: skipped
    name, why = resolve_precision(_fake(m, bf16=False), "auto", cpu=bf16)
    assert name == "fp32" and "did not hold the agreement bars" in why
    # Asked for by name: INT8 runs on any CPU (and an unvalidated variant too); bf16 needs bf16 support.
    assert resolve_precision(both, "int8", cpu=plain)[0] == "int8"
    assert resolve_precision(_fake(m, int8=False), "int8", cpu=plain)[0] == "int8"
    with pytest.raises(EngineError, match="no bf16 support"):
        resolve_precision(both, "bf16", cpu=vnni)
    with pytest.raises(ModelError, match="no int8 variant"):
        resolve_precision(_fake(m, bf16=True), "int8", cpu=bf16)
    with pytest.raises(EngineError, match="unknown precision"):
        resolve_precision(both, "fp8", cpu=bf16)
    assert resolve_precision(both, "auto", backend="onnxruntime", cpu=bf16)[0] == "fp32"
    with pytest.raises(EngineError, match="openvino backend"):
        resolve_precision(both, "int8", backend="onnxruntime", cpu=bf16)


def test_default_precision_comes_from_the_environment(tiny_export, monkeypatch):
    monkeypatch.setenv("MCP_MEDSAM_PRECISION", "fp32")
    assert resolve_precision(_fake(load_manifest(tiny_export), int8=True), None,
                             cpu=CpuFeatures("x", frozenset(), frozenset({"avx512_vnni"})))[0] == "fp32"


def test_compiled_cache_folder_is_keyed_by_the_precision_hint():
    # OpenVINO's own cache key ignores the hint: a blob compiled for f32 loaded for bf16 crashes.
    h = {"decoder.xml": "ab" * 32, "decoder.bin": "cd" * 32}
    assert content_key(h) == content_key(h, {"decoder.xml": "f32"})
    assert content_key(h, {"decoder.xml": "bf16"}) != content_key(h)


def test_a_malformed_variant_is_refused(tiny_export, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(tiny_export, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["variants"] = {"bf16": {"graphs": {"decoder": {"segments": [{"file": "../decoder.xml", "hint": "bf16"}]}}}}
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="not a plain file name"):
        load_manifest(folder)
    raw["variants"] = {"bf16": {"graphs": {"decoder": {"segments": [{"file": "decoder.xml", "hint": "fp8"}]}}}}
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="'hint'"):
        load_manifest(folder)


def test_groups_cover_every_op_and_a_split_graph_computes_the_graph(tiny_export):
    import openvino as ov

    from mcp_medsam.engine import compile_openvino
    from mcp_medsam_torch.precision import RULES, ChainIR, GraphOps, split_graph

    m = load_manifest(tiny_export)
    rng = np.random.default_rng(0)
    feeds = {"image_encoder": {"image": rng.random((2, 3, 64, 64), dtype=np.float32)},
             "decoder": {"image_embeddings": rng.normal(0, 0.1, (2, 32, 16, 16)).astype(np.float32),
                         "embedding_index": np.array([0, 1, 1]), "modality_index": np.array([0, 3, 5]),
                         "boxes": np.array([[1, 2, 30, 40], [0, 0, 63, 63], [10, 9, 20, 30]], np.float32),
                         "crops": rng.random((3, 3, 16, 16), dtype=np.float32), **prompts.padding_points(3)}}
    expected = {"image_encoder": {"patch_embed", "mbconv.0", "merge.0", "attn.1.0", "mlp.1.0", "neck"},
                "decoder": {"prompt", "crop.conv", "crop.conv1", "transformer.0", "transformer.final", "f4.modality",
                            "f4.content", "f4.fuse", "upscaling", "heads"}}
    for graph, low in (("image_encoder", {"attn.1.0", "neck"}), ("decoder", {"crop.conv1", "upscaling"})):
        xml = m.graph_file(graph, "openvino")
        ops = GraphOps(ov.Core().read_model(str(xml)), RULES[graph])
        assert all(ops.label[n] is not None for n in ops.compute_ops()), graph
        assert expected[graph] <= set(ops.groups), ops.groups
        segments = split_graph(xml, RULES[graph], low)
        hints = [s.hint for s in segments]
        assert len(segments) >= 3 and all(a != b for a, b in zip(hints, hints[1:])), hints  # alternating
        for s in segments:
            s.hint = "f32"
        outputs = list(m.graphs[graph].outputs)
        got = ChainIR(segments, outputs)(feeds[graph])
        req = compile_openvino(xml).create_infer_request()
        req.infer(feeds[graph])
        # The chain is the graph: every f32 segment computes exactly what the graph computes there.
        np.testing.assert_array_equal(got, req.get_output_tensor(0).data)


def test_int8_variant_is_written_beside_the_fp32_files_and_runs(int8_folder, tiny_export, data, tmp_path):
    folder, report = int8_folder
    before, after = _sha(tiny_export), _sha(folder)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # FP32 files byte-identical
    raw = json.loads((folder / "manifest.json").read_text())
    v = raw["variants"]["int8"]
    files = [s["file"] for g in v["graphs"].values() for s in g["segments"]]
    assert files and all((folder / f).is_file() and "FakeQuantize" in (folder / f).read_text() for f in files)
    assert set(v["agreement"]["calibration_cases"]).isdisjoint(v["agreement"]["validation_cases"])
    assert v["agreement"]["2d_n"] > 0 and v["agreement"]["3d_n"] > 0
    assert [r.precision for r in report.study] and report.candidates[0].judgement is not None
    proc = run_cli("verify-weights", str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the variant's files are recorded and checked
    # The runtime runs it when asked for by name, on any CPU; auto only when it held the bars and the CPU has VNNI.
    seg = Segmenter.load(folder, precision="int8", threads=1)
    assert seg.precision == "int8"
    auto = Segmenter.load(folder, threads=1).precision
    assert auto == ("int8" if v["validated"] and cpu_features().has("VNNI") else "fp32")
    from mcp_medsam.evaluation.agreement import box_agreement, box_masks

    ref = Segmenter.load(folder, precision="fp32", threads=1)
    for name in CASES[2:4]:
        assert box_agreement(box_masks(ref, data / name), box_masks(seg, data / name)).mean() > 0.8, name
    # predict --precision int8 writes what the API gives, bit for bit.
    one = tmp_path / "one"
    one.mkdir()
    (one / CASES[3]).symlink_to(data / CASES[3])
    proc = run_cli("predict", "-i", str(one), "-o", str(tmp_path / "out"), "--weights", str(folder),
                   "--precision", "int8", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out" / CASES[3]) as out, np.load(one / CASES[3]) as case:
        np.testing.assert_array_equal(out["segs"], seg.segment_volume(case["imgs"], case["boxes"], "MR"))


@needs_bf16
def test_bf16_variant_holds_the_bars_and_auto_runs_it(tiny_export, data, tmp_path):
    from mcp_medsam_torch.precision import VariantConfig, _stage, _variant_files, build_variants

    folder = tmp_path / "w"
    shutil.copytree(tiny_export, folder)
    report = build_variants(folder, VariantConfig(data=data, precisions=("bf16",), calibration_cases=2,
                                                  study_slices=2, chain_slices=4, max_candidates=1))
    assert report.written == ["bf16"], [c.judgement for c in report.candidates]
    assert Segmenter.load(folder, threads=1).precision == "bf16"
    # A mix with f32 groups is a chain of segment files; the engine runs it like the graph.
    graphs, files = _variant_files(folder, "bf16", {"image_encoder": ["patch_embed", "neck"]}, None, 16)
    assert len(graphs["image_encoder"]["segments"]) >= 3
    staged = _stage(folder, {"bf16": {"graphs": graphs, "requires": ["BF16"], "validated": True}}, files,
                    tmp_path / "mix")
    mix = Segmenter.load(staged, precision="bf16", threads=1)
    fp32 = Segmenter.load(staged, precision="fp32", threads=1)
    img = np.load(data / CASES[1])["imgs"]
    a, b = fp32.engine.encode(_encoder_input(img)), mix.engine.encode(_encoder_input(img))
    assert np.abs(a - b).max() / np.abs(a).max() < 0.05 and not np.array_equal(a, b)


def _encoder_input(img: np.ndarray) -> np.ndarray:
    from mcp_medsam import preprocess

    return preprocess.encoder_input(img, 64)[0][None]


def test_precision_option_errors_are_one_line(tiny_export, tmp_path):
    one = tmp_path / "in"
    one.mkdir()
    (one / CASES[1]).symlink_to(need(SAMPLE / "imgs" / CASES[1]))
    proc = run_cli("predict", "-i", str(one), "-o", str(tmp_path / "o"), "--weights", str(tiny_export),
                   "--precision", "int8")
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1 and "no int8 variant" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("predict", "-i", str(one), "-o", str(tmp_path / "o"), "--precision", "fp8")
    assert proc.returncode == 2 and "fp8" in proc.stderr


def test_bench_compares_every_precision_side_by_side(int8_folder, data, tmp_path):
    folder, _ = int8_folder
    proc = run_cli("bench", "-i", str(data), "--weights", str(folder), "--no-torch", "--no-cold",
                   "--threads", "1", "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["precisions"] == ["fp32", "int8"] and "INT8" in rep["cpu"]
    rows = {(r["case"], r["precision"]): r for r in rep["rows"]}
    assert len(rows) == 2 * len(CASES)
    for name in CASES:
        assert np.isnan(rows[(name, "fp32")]["agreement"]) and 0 <= rows[(name, "int8")]["agreement"] <= 1
        assert rows[(name, "fp32")]["dsc"] >= 0 and rows[(name, "int8")]["warm_s"] > 0
    assert "int8" in proc.stdout and "x32" in proc.stdout


def test_mix_option_names_groups_or_the_found_mix():
    from mcp_medsam_torch.config import ExportError
    from mcp_medsam_torch.precision import MIXES, parse_mix

    assert parse_mix([], ("bf16",)) is None
    assert parse_mix(["found"], ("bf16",)) == MIXES["bf16"]
    assert parse_mix(["decoder:prompt", "decoder:heads", "image_encoder:*"], ("bf16", "int8")) == {
        "decoder": ["prompt", "heads"], "image_encoder": ["*"]}
    for bad, precisions in ((["found"], ("int8",)), (["found"], ("bf16", "int8")), (["decoder"], ("bf16",)),
                            (["clip:all"], ("bf16",))):
        with pytest.raises(ExportError):
            parse_mix(bad, precisions)


@needs_bf16
@pytest.mark.slow
def test_found_bf16_mix_is_judged_alone_without_a_study(tiny_export, data, tmp_path):
    """--mix found: no sensitivity study, one candidate (the encoder whole in FP32: only the per-box
    graph is split), judged against the bars like any mix."""
    from mcp_medsam_torch.precision import MIXES

    folder = tmp_path / "w"
    shutil.copytree(tiny_export, folder)
    proc = run_cli("variants", str(folder), "--data", str(data), "--precision", "bf16", "--mix", "found",
                   "--calibration-cases", "2", "--keep-unvalidated", "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["study"] == [] and len(report["candidates"]) == 1
    assert report["candidates"][0]["f32_groups"] == MIXES["bf16"]
    variant = json.loads((folder / "manifest.json").read_text())["variants"]["bf16"]
    assert set(variant["graphs"]) == {"decoder"} and len(variant["graphs"]["decoder"]["segments"]) >= 2
    assert variant["f32_groups"] == MIXES["bf16"]
