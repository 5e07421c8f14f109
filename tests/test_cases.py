"""Case validation: every kind of bad input gets its own clear message."""

from __future__ import annotations

import numpy as np
import pytest

from mcp_medsam.io.npz import load_case
from mcp_medsam.errors import InputError


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


IMG2 = np.zeros((40, 50, 3), np.uint8)
IMG3 = np.zeros((6, 40, 50), np.uint8)


@pytest.mark.parametrize("arrays,message", [
    ({"boxes": np.array([[1, 1, 5, 5]])}, "missing key(s) imgs"),
    ({"imgs": IMG2}, "missing key(s) boxes"),
    ({"imgs": np.zeros((4, 40, 50, 3), np.uint8), "boxes": np.array([[1, 1, 5, 5]])}, "needs (H, W, 3) or (H, W)"),
    ({"imgs": IMG2, "boxes": np.array([[1, 1, 5, 5, 1, 1]])}, "boxes of 6 coordinates in a 2DBox_ case"),
    ({"imgs": IMG2.astype(bool), "boxes": np.array([[1, 1, 5, 5]])}, "imgs has dtype bool"),
    ({"imgs": IMG2.astype(np.int16) + 300, "boxes": np.array([[1, 1, 5, 5]])}, "values span 300..300; expected 0..255"),
    ({"imgs": np.full((40, 50, 3), np.nan, np.float32), "boxes": np.array([[1, 1, 5, 5]])}, "NaN"),
    ({"imgs": IMG2, "boxes": np.array([[1, 1, 5]])}, "boxes has shape (1, 3)"),
    ({"imgs": IMG2, "boxes": np.array([[60, 1, 70, 5]])}, "lies wholly outside the image"),
    ({"imgs": IMG2, "boxes": np.array([[9, 1, 5, 5]])}, "is inverted (x_max < x_min)"),
    ({"imgs": IMG2, "boxes": np.array([[1, 3, 9, 3]])}, "is empty (zero height)"),
    ({"imgs": IMG3, "boxes": np.array([[1, 1, 4, 9, 9, 2]])}, "is inverted (z_min > z_max)"),
    ({"imgs": IMG3, "boxes": np.array([[1, 1, 7, 9, 9, 9]])}, "lies wholly outside"),
    ({"imgs": IMG2, "boxes": np.array([[1, 1, np.nan, 5]])}, "boxes contain NaN"),
])
def test_bad_inputs(tmp_path, arrays, message):
    boxes = arrays.get("boxes")
    kind = "3DBox" if boxes is not None and boxes.shape[-1] == 6 and arrays.get("imgs") is IMG3 else "2DBox"
    path = save(tmp_path / f"{kind}_CT_x.npz", **arrays)
    with pytest.raises(InputError) as err:
        load_case(path)
    assert message in str(err.value)


def test_unreadable_files(tmp_path):
    (tmp_path / "a.npz").write_text("plain text")
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_case(tmp_path / "a.npz")
    np.save(tmp_path / "b.npy", IMG2)
    (tmp_path / "b.npy").rename(tmp_path / "b.npz")
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_case(tmp_path / "b.npz")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04" + bytes(20))  # a truncated archive
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_case(tmp_path / "t.npz")
    vol = save(tmp_path / "3DBox_CT_y.npz", imgs=IMG3, boxes=np.array([[1, 1, 5, 5]]))
    with pytest.raises(InputError, match="boxes of 4 coordinates in a 3DBox_ case"):
        load_case(vol)
    np.savez(tmp_path / "c.npz", imgs=np.array([object()], dtype=object), boxes=np.zeros((0, 4)))
    with pytest.raises(InputError, match="imgs has dtype object"):
        load_case(tmp_path / "c.npz")


def test_good_inputs_are_normalised(tmp_path):
    # Grey 2D image, float values in range, a box partly outside (clipped).
    case = load_case(save(tmp_path / "g.npz", imgs=np.full((40, 50), 7.0), boxes=np.array([[-5, 2, 60, 30]])))
    assert case.image.shape == (40, 50, 3) and case.image.dtype == np.uint8 and case.image[0, 0, 0] == 7
    np.testing.assert_array_equal(case.boxes, [[0, 2, 49, 30]])
    # 3D without spacing, a z range partly outside.
    case = load_case(save(tmp_path / "v.npz", imgs=IMG3, boxes=np.array([[1, 1, -2, 9, 9, 20]])))
    assert case.is_3d and case.shape == (6, 40, 50)
    np.testing.assert_array_equal(case.boxes, [[1, 1, 0, 9, 9, 5]])
    # No boxes at all is a valid case (all background).
    case = load_case(save(tmp_path / "e.npz", imgs=IMG2, boxes=np.zeros((0, 4))))
    assert case.boxes.shape == (0, 4) and not case.is_3d
    # More than 255 boxes need uint16 labels.
    many = np.array([[1, 1, 5, 5]] * 300)
    assert load_case(save(tmp_path / "m.npz", imgs=IMG2, boxes=many)).label_dtype == np.uint16
    assert load_case(save(tmp_path / "n.npz", imgs=IMG2, boxes=many[:255])).label_dtype == np.uint8
