"""Clicks through the HTTP service's segment endpoint equal the array API's (tiny export, which takes points)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import SAMPLE, need

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from mcp_medsam.serve import ServeConfig  # noqa: E402
from mcp_medsam.serve.app import create_app  # noqa: E402
from mcp_medsam.serve.results import from_run_lengths  # noqa: E402

CASE_2D = "2DBox_XRay_Shenzhen_CHNCXR-0001-0.npz"
CASE_3D = "3DBox_MR_MSDHippocampus_001.npz"


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    config = ServeConfig(temp_dir=tmp_path_factory.mktemp("serve"))
    with TestClient(create_app(segmenter=tiny, config=config), base_url="http://127.0.0.1") as client:
        yield client


def _upload(api, name):
    with open(need(SAMPLE / "imgs" / name), "rb") as f:
        r = api.post("/v1/images", files={"file": (name, f, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_2d_clicks_equal_the_api(api, tiny):
    with np.load(SAMPLE / "imgs" / CASE_2D) as d:
        img, boxes = d["imgs"], d["boxes"]
    iid = _upload(api, CASE_2D)
    body = {"boxes": boxes.tolist(), "points": [[[250, 250], [100, 400]]], "point_labels": [[1, 0]]}
    j = api.post(f"/v1/images/{iid}/segment", json=body, headers={"Accept": "application/json"}).json()
    got = from_run_lengths(j["labels"]["rle"], img.shape[:2])
    ref = tiny.segment_image(img, boxes, "XRay", points=[[[250, 250], [100, 400]]], point_labels=[[1, 0]])
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(ref, tiny.segment_image(img, boxes, "XRay"))


def test_3d_clicks_equal_the_api(api, tiny):
    path = need(SAMPLE / "imgs" / CASE_3D)
    with np.load(path) as d:
        vol = d["imgs"]
    iid = _upload(api, CASE_3D)
    box = [[9, 31, 8, 27, 44, 11]]
    first = api.post(f"/v1/images/{iid}/segment", json={"boxes": box}, headers={"Accept": "application/json"}).json()
    prev = from_run_lengths(first["labels"]["rle"], vol.shape)
    click = {"boxes": box, "points": [[[15, 36, 9]]], "point_labels": [[0]]}
    r = api.post(f"/v1/images/{iid}/segment", json=click)
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content)) as out:
        got = out["segs"]
    ref = tiny.refine_volume(vol, box, "MR", points=[[[15, 36, 9]]], point_labels=[[0]], prev=prev)
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, prev)
    bad = api.post(f"/v1/images/{iid}/segment", json={"boxes": box, "points": [[[15, 36]]], "point_labels": [[1]]})
    assert bad.status_code == 422 and "[x, y, z]" in bad.text
    bad = api.post(f"/v1/images/{iid}/segment", json={"boxes": box, "points": [[[15, 36, 9]]]})
    assert bad.status_code == 422 and "go together" in bad.text
