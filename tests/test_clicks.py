"""The CVPR 2025 click rule (mcp_medsam.interactive.clicks) against hand-made masks.

Each expected click is worked out by hand from the rule: largest fully connected error component,
the voxel deepest inside it (image border counting as outside), fg where the truth is the class.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the click rule needs the eval extra (scipy)")

from mcp_medsam.interactive.clicks import challenge_classes, click_round, component_edt, largest_component, next_click


def test_missed_square_gets_a_foreground_click_at_its_centre():
    truth = np.zeros((11, 11), bool)
    truth[2:9, 2:9] = True  # 7x7 square, centre (5, 5)
    click = next_click(np.zeros_like(truth), truth)
    assert click.at == (5, 5) and click.foreground and click.kind == "fg"


def test_false_positive_gets_a_background_click():
    truth = np.zeros((9, 12), bool)
    truth[1:4, 1:4] = True
    pred = truth.copy()
    pred[3:8, 5:10] = True  # a 5x5 false positive, centre (5, 7), beside a correct object
    click = next_click(pred, truth)
    assert click.at == (5, 7) and not click.foreground


def test_largest_component_wins_and_diagonal_voxels_connect():
    err = np.zeros((8, 8), bool)
    err[0, 0] = err[1, 1] = err[2, 2] = True  # 3 voxels touching at corners: one component (8-connected)
    err[5, 5] = err[5, 6] = True  # 2 voxels
    comp = largest_component(err)
    assert comp.sum() == 3 and comp[1, 1]


def test_26_connectivity_in_3d():
    err = np.zeros((3, 3, 3), bool)
    err[0, 0, 0] = err[1, 1, 1] = err[2, 2, 2] = True  # touching at corners only
    assert largest_component(err).sum() == 3


def test_image_border_counts_as_the_edge_of_the_error():
    # The error fills the image's left 4 columns; the deepest voxel is 2 columns from the border,
    # not at column 0 (an EDT without the border would put it there).
    truth = np.zeros((9, 10), bool)
    truth[:, :4] = True
    edt = component_edt(truth)
    assert edt[4, 0] == 1 and edt[4, 1] == 2 and edt[4, 2] == 2
    click = next_click(np.zeros_like(truth), truth)
    assert click.at[1] in (1, 2) and click.foreground


def test_ties_follow_the_challenges_seed_42_draw():
    truth = np.zeros((5, 9), bool)
    truth[1:4, 1:8] = True  # a 3x7 bar: 5 voxels of the middle row at distance 2
    ties = [(2, c) for c in range(2, 7)]
    click = next_click(np.zeros_like(truth), truth)
    np.random.seed(42)  # the challenge's sample_coord
    assert click.at == ties[np.random.choice(len(ties))]


def test_one_voxel_error_and_no_error():
    truth = np.zeros((4, 4, 4), bool)
    truth[1, 2, 3] = True
    assert next_click(np.zeros_like(truth), truth).at == (1, 2, 3)
    assert next_click(truth, truth) is None


def test_click_round_per_class_in_challenge_order():
    truth = np.zeros((2, 10, 10), np.uint8)
    truth[:, 1:6, 1:6] = 3  # classes 3 and 7: entry 0 is class 3, entry 1 class 7
    truth[:, 7:10, 7:10] = 7
    pred = np.zeros_like(truth)
    pred[:, 7:10, 7:10] = 7  # class 7 perfect
    pred[:, 0, :] = 3  # class 3: its object missed, a thin false positive row
    clicks, order = [], []
    new = click_round(pred, truth, clicks, order)
    assert challenge_classes(truth) == [3, 7]
    assert new[1] is None and order[1] == [None]
    assert new[0].foreground and clicks[0]["fg"] == [list(new[0].at)] and order[0] == ["fg"]
    assert truth[new[0].at] == 3
    pred[truth == 3] = 3  # the object found: only the false-positive row is left
    click_round(pred, truth, clicks, order)
    assert order[0] == ["fg", "bg"] and clicks[0]["bg"][0][1] == 0
