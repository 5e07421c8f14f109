"""DSC / NSD against answers derived independently of the metrics module's pipeline (no shared data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from mcp_medsam.evaluation.metrics import case_scores, dice, nsd, surfel_area_table


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Bool ellipsoid: voxels whose centre is within ``radius`` mm of ``centre`` (voxel coords)."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return d2 <= radius ** 2


def brute_surfels(mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(points in mm (N, 3), areas (N,)) of the surfels of a 3D mask, one 2x2x2 cell at a time.

    Written as plain loops (no correlation, no bit tricks shared with mcp_medsam.evaluation.metrics): cell (i, j, k)
    covers voxels i-1..i, j-1..j, k-1..k of the mask; corner (a, b, c) weighs 2**(7 - 4a - 2b - c). The
    areas come from the table under test, which is itself held to the challenge's literal table
    (test_table_equals_the_challenges_literal_table_entry_by_entry).
    """
    table = surfel_area_table(tuple(float(s) for s in spacing))
    padded = np.zeros(tuple(n + 2 for n in mask.shape), dtype=bool)
    padded[1:-1, 1:-1, 1:-1] = mask
    points, areas = [], []
    for i in range(mask.shape[0] + 1):
        for j in range(mask.shape[1] + 1):
            for k in range(mask.shape[2] + 1):
                code = 0
                for a in (0, 1):
                    for b in (0, 1):
                        for c in (0, 1):
                            if padded[i + a, j + b, k + c]:
                                code += 2 ** (7 - 4 * a - 2 * b - c)
                if code not in (0, 255):
                    points.append((i * spacing[0], j * spacing[1], k * spacing[2]))
                    areas.append(table[code])
    return np.array(points, dtype=np.float64), np.array(areas)


def brute_nsd(gt: np.ndarray, seg: np.ndarray, spacing, tolerance: float) -> float:
    """NSD from brute-force surfels and nearest-neighbour distances by a k-d tree (no EDT)."""
    gp, ga = brute_surfels(gt, spacing)
    sp, sa = brute_surfels(seg, spacing)
    d_gs, _ = cKDTree(sp).query(gp)
    d_sg, _ = cKDTree(gp).query(sp)
    return float((ga[d_gs <= tolerance].sum() + sa[d_sg <= tolerance].sum()) / (ga.sum() + sa.sum()))


def box_surface_area(n, s) -> float:
    """Marching-cubes surface area (mm^2) of an n0 x n1 x n2 voxel cuboid at spacing s.

    Flat faces between voxel centres, 45-degree (in voxel units) bevels along the 12 edges, one
    triangle per corner: faces 2 * sum (n_j - 1)(n_k - 1) s_j s_k; bevels 4 (n_i - 1) s_i
    * sqrt(s_j^2 + s_k^2) / 2; corners 8 * sqrt(s1^2 s2^2 + s0^2 s2^2 + s0^2 s1^2) / 8.
    """
    (n0, n1, n2), (s0, s1, s2) = n, s
    faces = 2 * ((n1 - 1) * (n2 - 1) * s1 * s2 + (n0 - 1) * (n2 - 1) * s0 * s2 + (n0 - 1) * (n1 - 1) * s0 * s1)
    bevels = 2 * ((n0 - 1) * s0 * math.hypot(s1, s2) + (n1 - 1) * s1 * math.hypot(s0, s2)
                  + (n2 - 1) * s2 * math.hypot(s0, s1))
    corners = math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2)
    return faces + bevels + corners


# --- the surfel area table --------------------------------------------------------------------

@pytest.mark.parametrize("n, spacing", [((4, 5, 3), (1.0, 1.0, 1.0)), ((6, 3, 4), (3.27, 0.9766, 0.9766)),
                                        ((5, 7, 1), (1.0, 1.0, 1.0)), ((3, 4, 5), (0.5, 2.0, 6.5))])
def test_box_surface_area_is_analytic(n, spacing):
    mask = np.zeros(tuple(k + 4 for k in n), dtype=bool)
    mask[2:2 + n[0], 2:2 + n[1], 2:2 + n[2]] = True
    _, areas = brute_surfels(mask, spacing)
    assert areas.sum() == pytest.approx(box_surface_area(n, spacing), rel=1e-12)


def test_table_values_and_symmetries():
    iso = surfel_area_table((1.0, 1.0, 1.0))
    assert iso[0] == iso[255] == 0
    assert iso[1] == pytest.approx(math.sqrt(3) / 8)  # one corner: the cut-off triangle
    assert iso[0b11110000] == pytest.approx(1.0)  # a whole face of the cell
    # Three corners in an L on one face give a bent pentagon; the challenge's table splits it into
    # the mid-plane right triangle (1/2) and two triangles of areas sqrt(3)/4 and sqrt(3)/8.
    assert iso[0b00000111] == pytest.approx(0.5 + 3 * math.sqrt(3) / 8)
    aniso = surfel_area_table((3.0, 0.7, 1.3))
    # A code and its complement have the same surface.
    assert np.allclose(aniso, aniso[::-1])
    assert np.allclose(iso, iso[::-1])


# --- dice / nsd ------------------------------------------------------------------------------

def test_identical_masks_score_one():
    m = ball((20, 24, 22), (10, 12, 11), 6.0)
    assert dice(m, m) == 1.0
    assert nsd(m, m, (2.5, 0.8, 0.8)) == 1.0
    m2 = m[10]
    assert dice(m2, m2) == 1.0 and nsd(m2, m2) == 1.0


def test_disjoint_far_masks_score_zero():
    a = np.zeros((10, 40, 40), dtype=bool)
    b = np.zeros_like(a)
    a[2:5, 2:8, 2:8] = True
    b[2:5, 30:36, 30:36] = True
    assert dice(a, b) == 0.0
    assert nsd(a, b, (1.0, 1.0, 1.0)) == 0.0
    assert nsd(a[3], b[3]) == 0.0


def test_shift_within_tolerance_is_perfect_nsd():
    # Shifting a mask by one voxel shifts its surfel set by one grid step: every surfel has a
    # partner exactly one spacing away, so NSD is 1 whenever that spacing is <= the tolerance.
    spacing = (3.0, 0.7, 0.9)
    gt = ball((16, 30, 26), (8, 15, 13), 5.0, spacing)
    for axis in (1, 2):
        assert nsd(gt, np.roll(gt, 1, axis=axis), spacing, tolerance=2.0) == 1.0
    assert nsd(gt, np.roll(gt, 1, axis=0), spacing, tolerance=3.0) == 1.0
    assert nsd(gt, np.roll(gt, 1, axis=0), spacing, tolerance=2.9) < 1.0


@pytest.mark.parametrize("tolerance", [1.0, 2.0])
def test_shifted_sphere_anisotropic_matches_brute_force(tolerance):
    spacing = (3.0, 0.7, 0.9)
    gt = ball((12, 28, 24), (6, 14, 12), 4.2, spacing)
    seg = np.roll(gt, 1, axis=0)  # 3 mm shift along z: larger than the tolerance
    expected = brute_nsd(gt, seg, spacing, tolerance)
    assert 0.0 < expected < 1.0
    assert nsd(gt, seg, spacing, tolerance) == pytest.approx(expected, abs=1e-12)
    assert nsd(seg, gt, spacing, tolerance) == pytest.approx(expected, abs=1e-12)


def test_irregular_masks_match_brute_force():
    rng = np.random.default_rng(3)
    spacing = (1.7, 0.6, 1.1)
    gt = rng.random((9, 14, 12)) < 0.45
    seg = gt ^ (rng.random(gt.shape) < 0.15)
    assert nsd(gt, seg, spacing, 2.0) == pytest.approx(brute_nsd(gt, seg, spacing, 2.0), abs=1e-12)


def test_2d_is_the_challenge_one_voxel_slab():
    rng = np.random.default_rng(5)
    gt = ball((40, 50), (20, 25), 12.0)
    seg = np.roll(gt, (3, -4), axis=(0, 1)) ^ (rng.random(gt.shape) < 0.02)
    value = nsd(gt, seg)
    assert 0.0 < value < 1.0
    # The challenge scores 2D cases as (H, W, 1) volumes at spacing 1; at unit spacing the
    # orientation of the slab does not matter.
    for vol_gt, vol_seg in ((gt[..., None], seg[..., None]), (gt[None], seg[None]), (gt[:, None], seg[:, None])):
        assert nsd(vol_gt, vol_seg, (1.0, 1.0, 1.0)) == pytest.approx(value, abs=1e-12)
    assert value == pytest.approx(brute_nsd(gt[..., None], seg[..., None], (1.0, 1.0, 1.0), 2.0), abs=1e-12)
    d2, n2, _ = case_scores(gt.astype(np.uint8), seg.astype(np.uint8))
    d3, n3, _ = case_scores(gt[None].astype(np.uint8), seg[None].astype(np.uint8), (1.0, 1.0, 1.0))
    assert (d2, n2) == pytest.approx((d3, n3), abs=1e-12)
    assert d2 == pytest.approx(dice(gt, seg))


def test_extruded_2d_mask():
    gt = ball((30, 30), (15, 15), 8.0)
    seg = np.roll(gt, 1, axis=1)
    ext_gt, ext_seg = np.repeat(gt[None], 7, axis=0), np.repeat(seg[None], 7, axis=0)
    assert dice(ext_gt, ext_seg) == pytest.approx(dice(gt, seg))
    # A one-pixel in-plane shift is within tolerance in 2D and in the extruded volume alike.
    assert nsd(gt, seg) == 1.0
    assert nsd(ext_gt, ext_seg, (1.0, 1.0, 1.0)) == 1.0


def test_empty_masks():
    empty = np.zeros((5, 6, 7), dtype=bool)
    full = empty.copy()
    full[1:3, 2:4, 2:5] = True
    assert dice(empty, empty) == 1.0 and nsd(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert nsd(full, empty) == 0.0 and nsd(empty, full) == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dice(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
    with pytest.raises(ValueError):
        case_scores(np.zeros((3, 4, 5), np.uint8), np.zeros((3, 4, 6), np.uint8), (1, 1, 1))


# --- case scores -----------------------------------------------------------------------------

def test_labels_are_averaged():
    gt = np.zeros((6, 20, 20), dtype=np.uint8)
    gt[1:5, 2:8, 2:8] = 1
    gt[1:5, 12:18, 12:18] = 2
    seg = gt.copy()
    seg[seg == 2] = 0  # label 2 not found
    dsc, nsd_, per = case_scores(gt, seg, (2.0, 1.0, 1.0))
    assert [p.label for p in per] == [1, 2]
    assert (per[0].dsc, per[0].nsd, per[1].dsc, per[1].nsd) == (1.0, 1.0, 0.0, 0.0)
    assert (dsc, nsd_) == (0.5, 0.5)


def test_labels_absent_from_both_are_skipped_and_extra_labels_ignored():
    gt = np.zeros((4, 12, 12), dtype=np.uint8)
    gt[1:3, 1:5, 1:5] = 1
    gt[1:3, 7:11, 7:11] = 3  # no label 2 anywhere
    seg = gt.copy()
    seg[0, 0, 0] = 9  # above max(gt): not scored, as in the challenge script
    dsc, nsd_, per = case_scores(gt, seg, (1.0, 1.0, 1.0))
    assert [p.label for p in per] == [1, 3]
    assert (dsc, nsd_) == (1.0, 1.0)
    seg[seg == 0] = 2  # a label 2 that the gt lacks is a wrong prediction: DSC 0 for it
    dsc, _, per = case_scores(gt, seg, (1.0, 1.0, 1.0))
    assert [p.label for p in per] == [1, 2, 3] and per[1].dsc == 0.0 and dsc == pytest.approx(2 / 3)


def test_gt_without_labels():
    gt = np.zeros((4, 5), dtype=np.uint8)
    assert case_scores(gt, gt.copy())[:2] == (1.0, 1.0)
    seg = gt.copy()
    seg[1, 1] = 1
    assert case_scores(gt, seg)[:2] == (0.0, 0.0)


def test_nsd_dsc_gate():
    gt = np.zeros((30, 30), dtype=np.uint8)
    seg = np.zeros_like(gt)
    gt[10:20, 10:20] = 1  # 100 px
    seg[10:20, 18:28] = 1  # 100 px, 20 overlap: DSC exactly 0.2
    dsc, gated, per = case_scores(gt, seg)
    assert dsc == pytest.approx(0.2)
    assert gated == 0.0 and per[0].nsd is None
    _, ungated, per = case_scores(gt, seg, nsd_dsc_gate=False)
    assert ungated > 0.0 and per[0].nsd == ungated
    seg[10:20, 17] = 1  # 30 px overlap: DSC 0.27, above the gate
    dsc, nsd_, _ = case_scores(gt, seg)
    assert dsc > 0.2 and nsd_ == case_scores(gt, seg, nsd_dsc_gate=False)[1] > 0.0


# The challenge's table, entry by entry. The challenge's surface-distance code (google-deepmind/
# surface-distance, surface_distance/lookup_tables.py, _NEIGHBOUR_CODE_TO_NORMALS; MedSAM's
# evaluation/SurfaceDice.py holds the same 256 entries as neighbour_code_to_normals) lists, per code,
# the normals of its marching-cubes triangles; an area at a spacing is the sum over the normals of
# |(n0 s1 s2, n1 s0 s2, n2 s0 s1)|. The area needs only the components' magnitudes, written here in
# eighths: "400.222.111" is the normals (±0.5, 0, 0), (±0.25, ±0.25, ±0.25), (±0.125, ±0.125, ±0.125).
CHALLENGE_NORMALS_IN_EIGHTHS = (
    '000 111 111 220.220 111 202.202 111.111 400.222.111 '
    '111 111.111 202.202 400.222.111 220.220 400.222.111 400.222.111 400.400 '
    '111 022.022 111.111 040.222.111 111.111 004.222.111 111.111.111 111.222.222.111 '
    '111.111 022.022.111 202.202.111 111.333.022.202 111.220.220 333.022.111.220 400.111.222.111 400.111.222 '
    '111 111.111 022.022 040.111.222 111.111 111.202.202 022.022.111 333.022.111.202 '
    '111.111 111.111.111 004.222.111 222.222.111.111 111.220.220 400.222.111.111 022.333.111.220 400.222.111 '
    '220.220 040.222.111 040.111.222 040.040 220.220.111 333.202.111.220 111.040.222.111 040.222.111 '
    '111.220.220 040.222.111.111 333.220.111.202 040.222.111 220.220.220.220 220.220.111 111.220.220 220.220 '
    '111 111.111 111.111 111.220.220 022.022 004.222.111 022.022.111 333.022.111.220 '
    '111.111 111.111.111 111.202.202 400.222.111.111 040.222.111 222.222.111.111 202.333.022.111 400.222.111 '
    '202.202 004.222.111 111.202.202 202.333.220.111 004.222.111 004.004 111.111.222.004 111.222.004 '
    '202.202.111 004.222.111.111 202.202.202.202 111.202.202 202.333.220.111 004.222.111 111.202.202 202.202 '
    '111.111 111.111.111 111.022.022 040.111.222.111 022.022.111 004.222.111.111 022.022.022.022 022.022.111 '
    '111.111.111 111.111.111.111 004.222.111.111 111.111.111 040.222.111.111 111.111.111 022.022.111 111.111 '
    '400.222.111 222.111.222.111 333.022.111.202 040.222.111 333.220.022.111 111.222.004 111.022.022 022.022 '
    '400.222.111.111 111.111.111 202.202.111 111.111 220.220.111 111.111 111.111 111 '
    '111 111.111 111.111 220.220.111 111.111 202.202.111 111.111.111 400.222.111.111 '
    '022.022 111.022.022 111.222.004 333.220.022.111 040.222.111 333.022.111.202 222.111.222.111 400.222.111 '
    '111.111 022.022.111 111.111.111 040.222.111.111 111.111.111 004.222.111.111 111.111.111.111 111.111.111 '
    '022.022.111 022.022.022.022 004.222.111.111 022.022.111 040.111.222.111 111.022.022 111.111.111 111.111 '
    '202.202 111.202.202 004.222.111 202.333.220.111 111.202.202 202.202.202.202 004.222.111.111 202.202.111 '
    '111.222.004 111.111.222.004 004.004 004.222.111 202.333.220.111 111.202.202 004.222.111 202.202 '
    '400.222.111 202.333.022.111 222.222.111.111 040.222.111 400.222.111.111 111.202.202 111.111.111 111.111 '
    '333.022.111.220 022.022.111 004.222.111 022.022 111.220.220 111.111 111.111 111 '
    '220.220 111.220.220 220.220.111 220.220.220.220 040.222.111 333.220.111.202 040.222.111.111 111.220.220 '
    '040.222.111 111.040.222.111 333.202.111.220 220.220.111 040.040 040.111.222 040.222.111 220.220 '
    '400.222.111 022.333.111.220 400.222.111.111 111.220.220 222.222.111.111 004.222.111 111.111.111 111.111 '
    '333.022.111.202 022.022.111 111.202.202 111.111 040.111.222 022.022 111.111 111 '
    '400.111.222 400.111.222.111 333.022.111.220 111.220.220 111.333.022.202 202.202.111 022.022.111 111.111 '
    '111.222.222.111 111.111.111 004.222.111 111.111 040.222.111 111.111 022.022 111 '
    '400.400 400.222.111 400.222.111 220.220 400.222.111 202.202 111.111 111 '
    '400.222.111 111.111 202.202 111 220.220 111 111 000'
).split()


def challenge_area(code: int, spacing: tuple[float, float, float]) -> float:
    """create_table_neighbour_code_to_surface_area(spacing)[code] of the challenge's code."""
    s0, s1, s2 = spacing
    total = 0.0
    for normal in CHALLENGE_NORMALS_IN_EIGHTHS[code].split("."):
        a, b, c = (int(d) / 8 for d in normal)
        total += math.sqrt((a * s1 * s2) ** 2 + (b * s0 * s2) ** 2 + (c * s0 * s1) ** 2)
    return total


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 1.3), (0.5, 2.0, 6.5), (2.5, 0.8, 0.8)])
def test_table_equals_the_challenges_literal_table_entry_by_entry(spacing):
    assert len(CHALLENGE_NORMALS_IN_EIGHTHS) == 256
    ours = surfel_area_table(spacing)
    for code in range(256):
        assert ours[code] == pytest.approx(challenge_area(code, spacing), rel=1e-12, abs=1e-15), code


def test_batch_dice_scores_each_pair_and_dice_is_its_single_case():
    from mcp_medsam.evaluation.dice import batch_dice

    a = np.zeros((3, 4, 5), bool)
    b = np.zeros_like(a)
    a[0, :2, :2] = b[0, :2, :2] = True  # identical
    a[1, :2, :2] = True  # 4 pixels against 2 of them
    b[1, :1, :2] = True
    # pair 2: both empty
    np.testing.assert_array_equal(batch_dice(a, b), [1.0, 2 * 2 / 6, 1.0])
    assert [dice(x, y) for x, y in zip(a, b)] == list(batch_dice(a, b))
    assert batch_dice(a.astype(np.uint8) * 7, b)[1] == pytest.approx(2 / 3)  # any non-zero value is foreground
    with pytest.raises(ValueError, match="shape mismatch"):
        batch_dice(a, b[:, :3])
