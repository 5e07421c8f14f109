"""Clicks (``/add_point_interaction``) through nnInteractive's protocol on a model that takes point prompts
(the tiny export): the unmodified PyPI client against a real ``mcp-medsam serve`` process, and the session
layer against the :meth:`Segmenter.refine_volume` calls it documents as equivalent."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")
pytest.importorskip("nnInteractive.inference.remote",
                    reason="nninteractive-client is not installed: pip install 'mcp-medsam[dev]'")

from test_nninteractive import BOX_Z, client, hippocampus, hippocampus_crop, serving  # noqa: E402

from mcp_medsam.errors import InputError  # noqa: E402
from mcp_medsam.interactive.session import InteractiveSession, convert  # noqa: E402


@pytest.fixture(scope="module")
def points_server(tiny_export, tiny):
    with serving("--weights", str(tiny_export), "--sessions", "1") as running:
        yield running


def _extent(mask: np.ndarray, axis: int, default: int) -> tuple[int, int]:
    idx = np.flatnonzero(mask.any(axis=tuple(k for k in range(3) if k != axis)))
    return (int(idx[0]), int(idx[-1])) if len(idx) else (default, default)


def test_a_click_after_a_box_is_refine_volume_and_undo_restores(points_server, tiny):
    """points advertised; a foreground click beside the 2D box on its slice: the object becomes refine_volume's
    result over the slices the box reached; undo brings the box's mask back in the client's buffer."""
    url, _ = points_server
    raw = hippocampus_crop()
    with client(url) as c:
        assert c.supported_interactions["points"] is True
        c.set_image(raw[None])
        buf = np.zeros(raw.shape, np.uint8)
        c.set_target_buffer(buf)
        with pytest.raises(httpx.HTTPStatusError) as err:  # nothing to refine yet
            c.add_point_interaction([3, 38, 31], include_interaction=False)
        assert err.value.response.status_code == 422 and "background click" in err.value.response.json()["detail"]
        with pytest.raises(httpx.HTTPStatusError) as err:
            c.add_point_interaction([3, 38], include_interaction=True)
        assert err.value.response.status_code == 422 and "[a0, a1, a2]" in err.value.response.json()["detail"]
        c.add_bbox_interaction(BOX_Z, include_interaction=True)
        first = buf.copy()
        click = [3, 38, 31]  # (z, y, x): 4 px right of the box on its slice
        changed = c.add_point_interaction(click, include_interaction=True)
        after = buf.copy()
        assert changed is not None and not np.array_equal(after, first)
        lo, hi = _extent(first, 0, 3)
        ref = tiny.refine_volume(convert(raw, "MR"), [[9, 31, lo, 27, 44, hi]], "MR", points=[[[31, 38, 3]]],
                                 point_labels=[[1]], prev=first, starts=[3]) == 1
        np.testing.assert_array_equal(after.astype(bool), ref)
        assert c.undo() is True
        np.testing.assert_array_equal(buf, first)
        # The click again, then a background click: both act (refine_volume with the two, oldest first).
        c.add_point_interaction(click, include_interaction=True)
        np.testing.assert_array_equal(buf, after)
        c.add_point_interaction([3, 36, 15], include_interaction=False)
        ref2 = tiny.refine_volume(convert(raw, "MR"), [[9, 31, lo, 27, 44, hi]], "MR",
                                  points=[[[31, 38, 3], [15, 36, 3]]], point_labels=[[1, 0]], prev=after,
                                  starts=[3]) == 1
        np.testing.assert_array_equal(buf.astype(bool), ref2)
        assert c.undo() is True and c.undo() is True
        np.testing.assert_array_equal(buf, first)


def test_clicks_in_the_session_layer(tiny):
    """A click with no box starts the object on its slice of axis 0 (the click's pixel as the box); a background
    click with nothing to refine is refused; a click on a box across axis 2 refines along axis 2."""
    raw = hippocampus()[:, 28:46, 8:14]  # 35 x 18 x 6
    session = InteractiveSession.from_native(segmenter=tiny, raw=raw, modality="MR", cache_slices=16)
    vol = session.volume
    started = session.new_object()
    with pytest.raises(InputError, match="background click needs an object"):
        session.add_point(started, [10, 9, 3], include=False)
    with pytest.raises(InputError, match="outside the image"):
        session.add_point(started, [35, 9, 3])
    session.add_point(started, [10, 9, 3])
    ref = tiny.refine_volume(vol, [[3, 9, 10, 4, 10, 10]], "MR", points=[[[3, 9, 10]]], point_labels=[[1]],
                             prev=np.zeros(vol.shape, np.uint8)) == 1
    np.testing.assert_array_equal(session.mask(started), ref)
    assert session.undo(started)[0] and not session.mask(started).any() and not session.objects[started].interactions
    # A one-slice image flat on axis 1 (a 2D picture sent as (H, 1, W)): the click starts it on that plane.
    flat = InteractiveSession.from_native(segmenter=tiny, raw=hippocampus()[:, 36:37, :], modality="MR",
                                          cache_slices=4)
    plane = flat.new_object()
    flat.add_point(plane, [20, 0, 18])
    ref = tiny.refine_volume(flat.volume.transpose(1, 0, 2), [[18, 20, 0, 19, 21, 0]], "MR", points=[[[18, 20, 0]]],
                             point_labels=[[1]], prev=np.zeros((1, *flat.shape[::2]), np.uint8)) == 1
    assert ref.any()
    np.testing.assert_array_equal(flat.mask(plane), ref.transpose(1, 0, 2))

    across = session.new_object()
    session.add_box(across, [[6, 17], [0, 18], [3, 4]])  # z 6..16, all of y, on x = 3
    boxed = session.mask(across).copy()
    session.add_point(across, [12, 9, 3], include=False)
    lo, hi = _extent(boxed, 2, 3)
    vol_x = np.ascontiguousarray(vol.transpose(2, 0, 1))  # (x, z, y)
    ref = tiny.refine_volume(vol_x, [[0, 6, lo, 17, 16, hi]], "MR", points=[[[9, 12, 3]]], point_labels=[[0]],
                             prev=boxed.transpose(2, 0, 1).astype(np.uint8), starts=[3]) == 1
    np.testing.assert_array_equal(session.mask(across), ref.transpose(1, 2, 0))
    assert session.undo(across)[0]
    np.testing.assert_array_equal(session.mask(across), boxed)


def test_a_click_on_a_3d_box_is_refine_volume_of_that_box(tiny):
    """A 3D box is the anchor as it is: its own z range and middle slice (the CVPR 2025 box and clicks)."""
    raw = hippocampus_crop()[:4]  # 4 x 51 x 35
    session = InteractiveSession.from_native(segmenter=tiny, raw=raw, modality="MR", cache_slices=16)
    oid = session.new_object()
    session.add_box(oid, [[0, 4], [31, 45], [9, 28]])
    boxed = session.mask(oid).copy()
    session.add_point(oid, [2, 40, 30])  # (z, y, x): right of the box, one slice above its middle
    ref = tiny.refine_volume(session.volume, [[9, 31, 0, 27, 44, 3]], "MR", points=[[[30, 40, 2]]],
                             point_labels=[[1]], prev=boxed.astype(np.uint8), starts=[1]) == 1
    assert not np.array_equal(ref, boxed)
    np.testing.assert_array_equal(session.mask(oid), ref)
