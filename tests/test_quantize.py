"""INT8 export: NNCF post-training quantisation of the IR with accuracy control against FP32."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SAMPLE, need, run_cli, tiny_checkpoint
from mcp_medsam.evaluation.dice import dice


def test_mask_dice_counts_only_the_image_region():
    from mcp_medsam_torch.quantize import mask_dice

    ref = np.full((2, 8, 8), -1.0, np.float32)
    got = ref.copy()
    ref[0, :2, :2] = got[0, :2, :2] = 1.0  # identical masks
    got[0, 6:, 6:] = 1.0  # disagreement in the padding: ignored
    ref[1, :2, :2] = 1.0  # disjoint
    got[1, 2:4, 2:4] = 1.0
    d = mask_dice(ref, got, (4, 4))
    np.testing.assert_allclose(d, [1.0, 0.0])
    assert mask_dice(ref[:1] * 0 - 1, got[:1] * 0 - 1, (4, 4))[0] == 1.0  # both empty


def test_calibration_cases_cover_every_modality():
    from mcp_medsam.modality import modality_token
    from mcp_medsam_torch.cases import spread_cases

    folder = need(SAMPLE / "imgs")
    groups = {(f.name.split("_")[0], modality_token(f.name)) for f in folder.glob("*.npz")}
    files = spread_cases(folder, 12)
    assert len(files) == 12
    # One case of every (2D/3D, modality) group before any group repeats.
    assert {(f.name.split("_")[0], modality_token(f.name)) for f in files[:len(groups)]} == groups
    # Verification's few picks hold 2D and 3D cases alike.
    assert [f.name[:5] for f in spread_cases(folder, 3, alternate_dims=True)] == ["2DBox", "3DBox", "2DBox"]
    assert sorted(spread_cases(folder, -1, alternate_dims=True)) == sorted(spread_cases(folder, -1))


@pytest.mark.slow
def test_int8_export_quantizes_verifies_and_predicts(tmp_path, tiny_export):
    from mcp_medsam_torch.exporter import ExportConfig, export_model

    sample = need(SAMPLE / "imgs")
    out = export_model(ExportConfig(out=tmp_path / "int8", checkpoint=tiny_checkpoint(tmp_path / "tiny.pth"),
                                    precision="int8", verify_data=sample, verify_cases=2, calibration_cases=3,
                                    # A random tiny model has no confident masks to keep: a lower target.
                                    int8_target_dice=0.95))
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8"
    q = m["quantization"]
    assert q["steps"][-1]["mean_dice"] >= q["target_dice"] and q["calibration_boxes"] > 0
    assert m["graphs"]["decoder"]["quantization"] == "int8"
    assert not list(out.glob("*.onnx")) and all(set(g["files"]) == {"openvino"} for g in m["graphs"].values())
    assert "FakeQuantize" in (out / "decoder.xml").read_text()
    # The runtime runs the INT8 folder unchanged; masks agree with the FP32 export of the same weights.
    case = "2DBox_Endoscopy_KvasirSEG_cju0qx73cjw570799j4n5cjze.npz"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / case).symlink_to(sample / case)
    for w, o in ((out, "o8"), (tiny_export, "o32")):
        r = run_cli("predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / o), "--weights", str(w))
        assert r.returncode == 0, r.stderr
    assert dice(np.load(tmp_path / "o8" / case)["segs"] > 0, np.load(tmp_path / "o32" / case)["segs"] > 0) >= 0.9


def test_a_clip_tower_is_refused_with_the_export_error(tiny_export, tmp_path):
    import shutil

    from mcp_medsam_torch.config import ExportConfig, ExportError
    from mcp_medsam_torch.quantize import quantize_folder

    folder = tmp_path / "w"
    shutil.copytree(tiny_export, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["graphs"]["clip_image"] = dict(m["graphs"]["image_encoder"])  # a folder that says it has a CLIP tower
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="CLIP image tower is not supported"):
        quantize_folder(folder, ExportConfig(out=folder, precision="int8"))
    assert json.loads((folder / "manifest.json").read_text()) == m  # nothing rewritten
