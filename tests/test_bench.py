"""`mcp-medsam bench` runs end to end and prints its table (no timing assertions: a benchmark)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, tiny_checkpoint


def test_bench_on_a_tiny_model(tiny_export, tmp_path):
    cases = tmp_path / "in"
    cases.mkdir()
    rng = np.random.default_rng(0)
    np.savez(cases / "2DBox_CT_a.npz", imgs=rng.integers(0, 256, (60, 80, 3), dtype=np.uint8),
             boxes=np.array([[5, 5, 40, 30], [20, 10, 70, 50]]))
    np.savez(cases / "3DBox_MR_b.npz", imgs=rng.integers(0, 256, (5, 40, 40), dtype=np.uint8),
             boxes=np.array([[5, 5, 1, 30, 30, 3]]))
    proc = run_cli("bench", "-i", str(cases), "--weights", str(tiny_export), "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "floor = FLOPs /" in out and "total" in out and "cold start per case" in out
    data = json.loads((tmp_path / "b.json").read_text())
    rows = {r["case"]: r for r in data["rows"]}
    assert data["throughput_gflops"] > 0
    # FLOPs are counted from the calls made: 1 image + 2 boxes, and 3 slices + 3 box-slices.
    g = json.loads((tiny_export / "manifest.json").read_text())["graphs"]
    enc, dec = g["image_encoder"]["gflops"], g["decoder"]["gflops"]
    assert abs(rows["2DBox_CT_a.npz"]["gflops"] - (enc + 2 * dec)) < 1e-6
    assert abs(rows["3DBox_MR_b.npz"]["gflops"] - (3 * enc + 3 * dec)) < 1e-6
    for r in rows.values():
        # Measured values only (a benchmark reports times; it does not assert an order between them).
        assert r["status"] == "ok" and r["warm_s"] > 0 and r["cold_s"] > 0 and r["cold_rss_mb"] > 0
        assert r["torch_s"] > 0  # the PyTorch model of the same checkpoint, side by side


@pytest.mark.slow
def test_bench_folded_beside_its_unfolded_baseline(tmp_path):
    """--baseline: the unfolded export runs beside the folded one in one run; each row's FLOPs are what
    its own graphs compute (the folded crop CNN not counted) and the masks agree."""
    import shutil

    from mcp_medsam_torch.exporter import ExportConfig, export_model
    from mcp_medsam_torch.fold import fold_folder
    from test_export import _zero_last_crop_conv

    ckpt = _zero_last_crop_conv(tiny_checkpoint(tmp_path / "t.pth"), tmp_path / "z.pth")
    plain = export_model(ExportConfig(out=tmp_path / "plain", checkpoint=ckpt, keep_onnx=False, fold=False))
    folded = tmp_path / "folded"
    shutil.copytree(plain, folded)
    assert fold_folder(folded).folded
    cases = tmp_path / "in"
    cases.mkdir()
    rng = np.random.default_rng(1)
    np.savez(cases / "2DBox_CT_a.npz", imgs=rng.integers(0, 256, (60, 80, 3), dtype=np.uint8),
             boxes=np.array([[5, 5, 40, 30], [20, 10, 70, 50], [0, 0, 79, 59]]))
    proc = run_cli("bench", "-i", str(cases), "--weights", str(folded), "--baseline", str(plain), "--no-torch",
                   "--precision", "fp32", "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "base-fp32" in proc.stdout and " xb " in proc.stdout
    rows = {r["precision"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "base-fp32"}
    g = {name: json.loads((f / "manifest.json").read_text())["graphs"] for name, f in
         (("fp32", folded), ("base-fp32", plain))}
    for name, r in rows.items():
        assert r["status"] == "ok" and r["cold_s"] > 0 and r["cold_rss_mb"] > 0
        assert abs(r["gflops"] - (g[name]["image_encoder"]["gflops"] + 3 * g[name]["decoder"]["gflops"])) < 1e-6
    assert rows["fp32"]["gflops"] < rows["base-fp32"]["gflops"]
    assert rows["base-fp32"]["agreement"] == 1.0 and rows["base-fp32"]["agreement_n"] == 3
