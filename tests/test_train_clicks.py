"""Click fine-tune (mcp_medsam_torch.train.clicks): the grid click on hand-made masks, and the tiny
variant's run (cache, teacher logits from an exported folder, simulated sessions, resume, judging)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grid_click_follows_the_challenge_rule_inside_the_image():
    from mcp_medsam_torch.train.clicks import grid_click

    target = np.zeros((16, 16), np.uint8)
    target[2:9, 2:9] = 1  # a 7x7 object
    logits = np.full((16, 16), -5.0, np.float32)
    assert grid_click(logits, target, (16, 16)) == (5.0, 5.0, 1.0)  # missed: fg click at its centre
    logits[2:9, 2:9] = 5.0
    logits[12:15, 11:14] = 5.0  # a 3x3 false positive, centre row 13, column 12
    assert grid_click(logits, target, (16, 16)) == (12.0, 13.0, 0.0)  # bg click, x then y
    logits[12:15, 11:14] = -5.0
    assert grid_click(logits, target, (16, 16)) is None
    logits[:, 12:] = 5.0  # a false positive only in the padding right of a 16 x 12 image
    assert grid_click(logits, target, (16, 12)) is None


def test_pad_clicks_pads_with_minus_one():
    from mcp_medsam_torch.train.clicks import pad_clicks

    coords, labels = pad_clicks([[(1.0, 2.0, 1.0), (3.0, 4.0, 0.0)], []])
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1.0, 0.0], [-1.0, -1.0]]
    assert coords[0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert pad_clicks([[], []])[1].tolist() == [[-1.0], [-1.0]]


def _subset(tmp: Path, names: list[str]) -> Path:
    root = tmp / "data"
    for sub in ("imgs", "gts"):
        (root / sub).mkdir(parents=True)
        for n in names:
            (root / sub / n).symlink_to(SAMPLE / sub / n)
    return root


@pytest.mark.skipif(not (SAMPLE / "imgs").is_dir(), reason="sample data missing")
def test_tiny_click_training_resumes_exactly_and_judges_held_out(tmp_path: Path, tiny_export: Path) -> None:
    from mcp_medsam_torch.checkpoints import read_checkpoint
    from mcp_medsam_torch.train.clicks import ClickConfig, run_click_training

    held = "2DBox_XRay_Shenzhen_CHNCXR-0004-0.npz"
    data = _subset(tmp_path, ["2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz", held, "3DBox_PET_STS_STS-002.npz"])
    init = tiny_checkpoint(tmp_path / "tiny.pth")  # the model tiny_export was exported from

    def cfg(out: Path, steps: int, **kw) -> ClickConfig:
        return ClickConfig(data_dirs=(str(data),), out_dir=str(out), init=str(init), teacher=str(tiny_export),
                           held_out=(held,), variant="tiny", steps=steps, batch_size=3, max_clicks=3, save_every=2,
                           rounds=2, max_slices_per_case=4, amp=False, threads=1, progress=False, **kw)

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_click_training(cfg(whole, 4)) == whole / "clicks.pth"
    s = json.loads((whole / "summary.json").read_text())
    assert s["split"]["held_out"] == [held] and held not in s["split"]["train"]
    for key in ("before", "after"):
        assert len(s[key]["dsc"]) == 3 and all(0 <= d <= 1 for d in s[key]["dsc"])  # box + 2 click rounds
        assert 0 <= s[key]["box_agreement_mean"] <= 1
    # before training, the student is the teacher's checkpoint: the box round agrees with its export
    assert s["before"]["box_agreement_min"] > 0.98
    agree = s["box_agreement_sample"]
    assert agree["boxes"] > 3 and 0 <= agree["min"] <= agree["mean"] <= 1 and agree["mean_3d"] is not None
    rows = list(csv.DictReader(open(whole / "clicks_steps.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(1 <= int(r["clicks"]) <= 3 for r in rows)
    assert all(np.isfinite(float(r["loss"])) for r in rows)

    # interrupted after 2 steps (clicks_last.pth), then continued to 4: the same weights
    run_click_training(cfg(part, 2))
    run_click_training(cfg(part, 4, cache_from=str(whole / "cache")))
    a, b = read_checkpoint(whole / "clicks.pth")["model"], read_checkpoint(part / "clicks.pth")["model"]
    assert read_checkpoint(part / "clicks.pth")["step"] == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    start = read_checkpoint(tiny_checkpoint(tmp_path / "again.pth"))["model"]
    fg, crop = "prompt_encoder.point_embeddings.1.weight", "prompt_encoder.crop_nets.conv.weight"
    assert not torch.equal(a[fg], start[fg]) and torch.equal(a[crop], start[crop])  # trained / frozen
