"""The array API (``mcp_medsam.Segmenter``) against the CLI, bit for bit, and its contract."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLE, need, run_cli
from mcp_medsam import InputError, SegmentationError, Segmenter, UnknownModality
from mcp_medsam.errors import ManifestError
from mcp_medsam.modality import modality_token
from mcp_medsam.segmenter import Walk


def _api_segs(seg: Segmenter, path) -> np.ndarray:
    """The case through the array API, from the raw NPZ arrays (not the CLI's reader)."""
    with np.load(path) as d:
        imgs, boxes = d["imgs"], d["boxes"]
    token = modality_token(path.name)
    if boxes.shape[1] == 6:
        return seg.segment_volume(imgs, boxes, modality=token)
    return seg.segment_image(imgs, boxes, modality=token)


def test_api_equals_cli_on_the_sample_set(tiny, tiny_export, tmp_path):
    """Every sample case, 2D and 3D: the CLI's segs and the API's labels are the same array."""
    imgs = need(SAMPLE / "imgs")
    proc = run_cli("predict", "-i", str(imgs), "-o", str(tmp_path), "--weights", str(tiny_export), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = sorted(imgs.glob("*.npz"))
    assert len(cases) >= 20
    for path in cases:
        with np.load(tmp_path / path.name) as d:
            cli = d["segs"]
        api = _api_segs(tiny, path)
        assert api.dtype == cli.dtype and api.shape == cli.shape, path.name
        np.testing.assert_array_equal(api, cli, err_msg=path.name)


def test_api_equals_cli_with_the_default_weights(tmp_path):
    """The bundled default (Segmenter.load() without a folder) on a few real 2D and 3D cases."""
    names = ["2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz", "2DBox_Mammo_DDSMtissue_A-0002-1-RIGHT-MLO.npz",
             "3DBox_MR_pyradiomics_brain1.npz"]
    inp = tmp_path / "in"
    inp.mkdir()
    for n in names:
        (inp / n).symlink_to(need(SAMPLE / "imgs" / n))
    proc = run_cli("predict", "-i", str(inp), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg = Segmenter.load()
    for n in names:
        with np.load(tmp_path / "out" / n) as d:
            np.testing.assert_array_equal(_api_segs(seg, inp / n), d["segs"], err_msg=n)


def test_embed_once_decode_many_is_segment_image(tiny):
    path = need(SAMPLE / "imgs" / "2DBox_Mammo_DDSMtissue_A-0002-1-RIGHT-MLO.npz")
    with np.load(path) as d:
        img, boxes = d["imgs"], d["boxes"]
    labels = tiny.segment_image(img, boxes, modality="Mammo")
    emb = tiny.embed(img)
    assert emb.shape == img.shape[:2] and emb.image.dtype == np.uint8
    masks, iou = tiny.decode(emb, boxes, modality="Mammo")
    assert masks.shape == (len(boxes),) + img.shape[:2] and masks.dtype == bool and iou.shape == (len(boxes),)
    composed = np.zeros(img.shape[:2], np.uint8)
    for label, m in enumerate(masks, start=1):
        composed[m] = label  # later boxes overwrite earlier ones
    np.testing.assert_array_equal(composed, labels)
    one, score = tiny.decode(emb, boxes[0], modality="Mammo")
    assert one.shape == img.shape[:2] and isinstance(score, float)
    np.testing.assert_array_equal(one, masks[0])


def test_grey_and_rgb_inputs_and_label_dtypes(tiny):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (60, 80), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    box = [[10, 10, 50, 40]]
    np.testing.assert_array_equal(tiny.segment_image(grey, box, "CT"), tiny.segment_image(rgb, box, "CT"))
    many = np.array([[x, 5, x + 4, 20] for x in range(0, 75, 1)] * 4)[:300]
    assert tiny.segment_image(grey, many, "CT").dtype == np.uint16
    assert tiny.segment_image(grey, np.zeros((0, 4)), "CT").dtype == np.uint8
    vol = rng.integers(0, 256, (6, 30, 40), dtype=np.uint8)
    out = tiny.segment_volume(vol, [[5, 5, 1, 30, 25, 4]], modality="MR")
    assert out.shape == vol.shape and out.dtype == np.uint8
    assert not out[0].any() and not out[5].any()  # outside the box's z range


def test_modality_is_an_argument_with_the_official_aliases(tiny):
    img = np.random.default_rng(1).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    box = [[5, 5, 40, 40]]
    assert tiny.modality_row("ct") == tiny.modality_row("CT")
    assert tiny.modality_row("X-Ray") != tiny.modality_row("XRay")  # own CLIP texts, own rows
    assert "Microscope" in tiny.modalities and "Mammo" in tiny.modalities
    np.testing.assert_array_equal(tiny.segment_image(img, box, "ct"), tiny.segment_image(img, box, "CT"))
    with pytest.raises(UnknownModality, match="unknown modality 'Foo'; accepted: CT, MR"):
        tiny.segment_image(img, box, "Foo")


@pytest.mark.parametrize("call,message", [
    (lambda s: s.segment_image(np.zeros((20, 20, 4), np.uint8), [[1, 1, 5, 5]], "CT"), "needs (H, W, 3) or (H, W)"),
    (lambda s: s.segment_image(np.zeros((20, 20), np.uint8), [[9, 1, 5, 5]], "CT"), "inverted"),
    (lambda s: s.segment_image(np.zeros((20, 20), np.uint8), [[1, 1, 5, 5, 1, 2]], "CT"), "needs (N, 4)"),
    (lambda s: s.segment_volume(np.zeros((20, 20), np.uint8), [[1, 1, 0, 5, 5, 1]], "CT"), "needs (D, H, W)"),
    (lambda s: s.segment_volume(np.zeros((4, 20, 20), np.uint8), [[1, 1, 0, 5, 5, 9]], "CT"), None),
    (lambda s: s.segment_volume(np.zeros((4, 20, 20), np.uint8), [[1, 1, 7, 5, 5, 9]], "CT"), "wholly outside"),
])
def test_bad_input_raises_one_error_class(tiny, call, message):
    if message is None:  # partly outside: clipped, not an error
        assert call(tiny).shape == (4, 20, 20)
        return
    with pytest.raises(InputError) as err:
        call(tiny)
    assert isinstance(err.value, SegmentationError) and message in str(err.value)


def test_load_of_a_folder_without_a_model(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json") as err:
        Segmenter.load(tmp_path)
    assert isinstance(err.value, SegmentationError)


def test_loading_leaves_the_callers_locale_alone(tmp_path):
    """OpenVINO's IR reader flips the C locale while it parses; graphs read side by side used to leave
    the caller's process in the ASCII "C" locale (text pipes then failed on UTF-8). Cold and warm cache."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    for _ in range(3):
        Segmenter.load(cache_dir=tmp_path, threads=1)
        assert locale.setlocale(locale.LC_ALL) == before


def test_walks_cover_the_z_range_inclusive():
    start = Walk(label=1, box=np.array([0, 0, 5, 5]), z=4, lo=2, hi=6)
    mask = np.ones((3, 3), bool)
    up, down = start.following(mask)
    assert (up.z, up.step, down.z, down.step) == (5, 1, 3, -1) and up.prev is mask
    seen, todo = [4], [up, down]
    while todo:
        wk = todo.pop()
        seen.append(wk.z)
        todo += wk.following(mask)
    assert sorted(seen) == [2, 3, 4, 5, 6]
    assert Walk(label=1, box=start.box, z=3, lo=3, hi=3).following(mask) == []


def test_readme_python_example_runs_as_written():
    from test_install import readme_python_example

    ns: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), ns)
    disc = (ns["yy"] - 150) ** 2 + (ns["xx"] - 220) ** 2 < 60 ** 2
    dice = 2 * (ns["mask"] & disc).sum() / (ns["mask"].sum() + disc.sum())
    assert dice > 0.9, dice
    np.testing.assert_array_equal(ns["labels"] == 1, ns["mask"])
    assert [bool(s.any()) for s in ns["labels3d"]] == [False, False, True, True, True, True, True, False, False]
