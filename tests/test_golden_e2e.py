"""Appliance golden segmentations through the real CLI (slow; runs once in CI).

Export the official-layout golden checkpoint with the tiny CLIP and the text-feature table, run
``mcp-medsam predict`` on the sample set and compare with the official MCP-MedSAM pipeline's
segmentations (../shared/reference/golden/segs), per label:

- 2D: Dice >= 0.99 on every label of every case.
- 3D: on the slices the official pipeline segmented (it skips z_min and z_max; we segment them on
  purpose), Dice >= 0.97 for every case (mean over labels) and for every label 1. Labels >= 2 are
  held to 0.95: the official propagated box depends on the label value (it resizes the label
  image, so label 2 gets a box up to a grid pixel wider than label 1 for the same mask), a quirk we
  do not copy; for label 1 our rule and the official one coincide. Measured: all 2D labels >= 0.9997,
  3D labels 1 >= 0.999, the one label 2 that differs 0.963.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN, SAMPLE, need, run_cli
from mcp_medsam.evaluation.dice import dice as _dice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "weights"
    proc = run_cli("export", "--checkpoint", str(need(GOLDEN / "mcp_medsam_golden.pth")), "--clip",
                   str(GOLDEN / "tiny_clip"), "--text-features", str(GOLDEN / "text_features.npy"),
                   "--out", str(out), "--verify-data", str(need(SAMPLE / "imgs")), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)  # the parity table, for the CI log
    return out


@pytest.fixture(scope="module")
def predicted(golden_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("segs")
    proc = run_cli("predict", "-i", str(SAMPLE / "imgs"), "-o", str(out), "--weights", str(golden_weights),
                   timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_export_verified_itself(golden_weights):
    """Every graph, both backends, each held to its stated bar (mcp_medsam_torch.verify.BARS)."""
    import json

    from mcp_medsam_torch.verify import BARS

    ver = json.loads((golden_weights / "manifest.json").read_text())["verification"]
    assert set(ver) == {"image_encoder", "decoder", "clip_image"}
    for graph, backends in ver.items():
        assert set(backends) == {"openvino", "onnxruntime"}
        bar = BARS[(graph, "fp32")]
        for fig in backends.values():
            assert fig["bar"] == str(bar) and bar.met(fig[bar.metric]), (graph, fig)
    for backend in ("openvino", "onnxruntime"):
        assert ver["decoder"][backend]["max_abs_diff"] < 1e-3


def test_matches_the_official_pipeline(predicted):
    worst_2d, report = 1.0, []
    for ref_path in sorted(need(GOLDEN / "segs").glob("*.npz")):
        name = ref_path.name
        with np.load(ref_path) as r, np.load(predicted / name) as p, np.load(SAMPLE / "imgs" / name) as c:
            ref, ours, boxes = r["segs"], p["segs"], c["boxes"]
        assert ours.shape == ref.shape, name
        dices = []
        for label, b in enumerate(boxes, start=1):
            if ref.ndim == 3:
                z0, z1 = int(b[2]), int(b[5])
                zs = slice(z0 + 1, z1) if z1 - z0 >= 2 else slice(z0, z0 + 1)
                d = _dice(ref[zs] == label, ours[zs] == label)
                assert d >= (0.97 if label == 1 else 0.95), (name, label, d)
            else:
                d = _dice(ref == label, ours == label)
                assert d >= 0.99, (name, label, d)
                worst_2d = min(worst_2d, d)
            dices.append(d)
        if ref.ndim == 3:
            assert np.mean(dices) >= 0.97, (name, dices)
        report.append(f"{name}: min {min(dices):.4f} mean {np.mean(dices):.4f}")
    print("\n".join(report))


def test_onnxruntime_backend_on_two_cases(golden_weights, predicted, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["2DBox_Mammo_DDSMtissue_A-0002-1-RIGHT-MLO.npz", "3DBox_MR_pyradiomics_brain1.npz"]
    for n in names:
        (inputs / n).write_bytes((SAMPLE / "imgs" / n).read_bytes())
    proc = run_cli("predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "--weights", str(golden_weights),
                   "--backend", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    for n in names:
        with np.load(predicted / n) as a, np.load(tmp_path / "out" / n) as b:
            labels = [v for v in np.unique(a["segs"]) if v]
            assert labels and all(_dice(a["segs"] == v, b["segs"] == v) >= 0.999 for v in labels), n


def test_live_crop_net_is_kept(golden_weights, tmp_path):
    """The authors' layout with a live crop CNN (non-zero last conv): nothing is provably constant, so
    the fold leaves the per-box graph alone and the crops input stays."""
    import json
    import shutil

    from mcp_medsam_torch.fold import fold_ir

    dec = json.loads((golden_weights / "manifest.json").read_text())["graphs"]["decoder"]
    assert "crops" in dec["inputs"] and "folded" not in dec
    for p in golden_weights.glob("decoder.*"):
        shutil.copy(p, tmp_path / p.name)
    result = fold_ir(tmp_path / "decoder.xml", compress_to_fp16=False)
    assert not result.folded and not result.zero_weights and "nothing input-independent" in result.reason
