"""The HTTP service (``mcp-medsam serve``) with the real default weights: every endpoint through
FastAPI's TestClient, the error paths, the token and the limits, results against the array API, and
the real command (a uvicorn server process on a loopback port) driven over HTTP."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, SAMPLE, SHARED, need, run_cli

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from mcp_medsam import Segmenter  # noqa: E402
from mcp_medsam.serve import ServeConfig  # noqa: E402
from mcp_medsam.serve.app import create_app  # noqa: E402
from mcp_medsam.serve.loadcheck import free_port, stop_server, wait_healthy  # noqa: E402
from mcp_medsam.serve.results import from_run_lengths  # noqa: E402

FORMATS = SHARED / "data" / "formats"
PNG = FORMATS / "png" / "CHNCXR-0001-0_image.png"
NIFTI = FORMATS / "nifti" / "hippocampus_001_image.nii.gz"
CASE_2D = "2DBox_Dermoscopy_PH2_IMD003.npz"
CASE_3D = "3DBox_MR_MSDHippocampus_001.npz"
BOXES = [[100, 100, 250, 400], [180, 150, 300, 300]]  # overlapping: the second overwrites the first


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.load(threads=1)


@contextlib.contextmanager
def client_for(seg: Segmenter, tmp: Path, **settings):
    config = ServeConfig(temp_dir=tmp, **settings)
    # A token-less server answers loopback Host names only (TestClient's default is "testserver").
    with TestClient(create_app(segmenter=seg, config=config), base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="module")
def api(seg, tmp_path_factory):
    with client_for(seg, tmp_path_factory.mktemp("serve")) as client:
        yield client


@pytest.fixture(scope="module")
def png_image(api) -> str:
    """The sample chest X-ray uploaded once (embedded at upload) for the tests that segment on it."""
    with open(need(PNG), "rb") as f:
        r = api.post("/v1/images", files={"file": (PNG.name, f, "image/png")}, data={"modality": "XRay"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def folders(root: Path) -> list[Path]:
    """The upload folders under a store's root (beside them: the owner lock)."""
    return sorted(p for p in root.iterdir() if p.is_dir())


def grey(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def decode_png(body: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)


def upload(client, path: Path, name: str | None = None, **fields) -> dict:
    with open(path, "rb") as f:
        r = client.post("/v1/images", files={"file": (name or path.name, f)}, data=fields)
    assert r.status_code == 201, r.text
    return r.json()


# ---------------------------------------------------------------- endpoints and results


def test_health_info_docs_and_page(api, seg):
    assert api.get("/healthz").json() == {"status": "ok", "auth": "none"}
    info = api.get("/v1/info").json()
    assert info["modalities"] == list(seg.modalities)
    assert info["model"]["precision"] == seg.manifest.precision
    assert info["model"]["description"] == seg.manifest.raw["description"]
    assert ".nii.gz" in info["formats"]["upload"] and ".npz" in info["formats"]["upload"]
    assert info["limits"] == {"max_upload_mb": 512.0, "max_image_mb": 1024.0, "max_images": 16, "max_boxes": 64,
                              "cache_mb": 1024.0}
    paths = api.get("/openapi.json").json()["paths"]
    for p in ("/v1/images", "/v1/images/{image_id}", "/v1/images/{image_id}/segment", "/v1/images/{image_id}/labels",
              "/v1/images/{image_id}/progress", "/v1/images/{image_id}/slices/{z}", "/v1/info", "/healthz"):
        assert p in paths, p
    assert "multipart/form-data" in paths["/v1/images"]["post"]["requestBody"]["content"]
    assert api.get("/docs").status_code == 200
    page = api.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="static/app.js"' in page.text and "//" not in page.text.split("<body>")[1].replace("</", "")
    js = api.get("/static/app.js")
    assert js.status_code == 200 and "window.mcpMedsam" in js.text


def test_2d_segment_equals_segment_image_in_every_format(api, seg, png_image):
    ref = seg.segment_image(grey(PNG), BOXES, "XRay")
    assert 0 < (ref == 1).sum() and 0 < (ref == 2).sum()
    encoded = seg.engine.stats.items.get("image_encoder", 0)

    r = api.post(f"/v1/images/{png_image}/segment", json={"boxes": BOXES})  # PNG is the default
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(decode_png(r.content), ref)
    _, ious = seg.decode(seg.embed(grey(PNG)), np.array(BOXES), "XRay")
    assert [float(v) for v in r.headers["x-iou"].split(",")] == pytest.approx(ious.tolist(), abs=1e-4)

    j = api.post(f"/v1/images/{png_image}/segment", json={"boxes": BOXES, "modality": "xray"},
                 headers={"Accept": "application/json"}).json()
    assert j["labels"]["shape"] == [512, 512] and j["labels"]["dtype"] == "uint8"
    np.testing.assert_array_equal(from_run_lengths(j["labels"]["rle"], (512, 512)), ref)
    assert j["iou"] == pytest.approx(ious.tolist(), abs=1e-5)

    r = api.post(f"/v1/images/{png_image}/segment", json={"boxes": BOXES}, headers={"Accept": "application/x-npz"})
    with np.load(io.BytesIO(r.content)) as d:
        np.testing.assert_array_equal(d["segs"], ref)
    # The latest result again, as a download; and the image was embedded once, at upload (the two
    # embed() calls above are this test's own reference).
    r = api.get(f"/v1/images/{png_image}/labels", headers={"Accept": "image/png"})
    assert 'filename="CHNCXR-0001-0_image_labels.png"' in r.headers["content-disposition"]
    np.testing.assert_array_equal(decode_png(r.content), ref)
    # A picture to look at: each label in its overlay colour (RGB), the background black.
    from mcp_medsam.overlay import label_colour

    r = api.get(f"/v1/images/{png_image}/labels?colour=true")
    assert 'filename="CHNCXR-0001-0_image_labels_colour.png"' in r.headers["content-disposition"]
    rgb = decode_png(r.content)[:, :, ::-1]
    assert (rgb[ref == 0] == 0).all()
    for label in (1, 2):
        assert (rgb[ref == label] == label_colour(label)[::-1]).all() and max(label_colour(label)) == 255
    r = api.get(f"/v1/images/{png_image}/labels?colour=true", headers={"Accept": "application/json"})
    assert r.status_code == 406 and "colour=true gives a PNG" in r.json()["detail"]
    assert seg.engine.stats.items.get("image_encoder", 0) == encoded + 1


def test_upload_answer_slices_and_delete(api, seg, tmp_path):
    d = upload(api, need(SAMPLE / "imgs" / CASE_2D))
    with np.load(SAMPLE / "imgs" / CASE_2D) as case:
        imgs, boxes = case["imgs"], case["boxes"]
    assert d["shape"] == list(imgs.shape[:2]) and d["dims"] == 2 and d["modality"] == "Dermoscopy"
    assert d["boxes"] == boxes.tolist() and d["format"] == "npz" and len(d["id"]) >= 22
    assert api.get(f"/v1/images/{d['id']}").json() == d
    r = api.get(f"/v1/images/{d['id']}/slices/0")
    np.testing.assert_array_equal(decode_png(r.content)[:, :, ::-1], imgs)  # RGB as uploaded
    assert api.get(f"/v1/images/{d['id']}/slices/1").status_code == 404
    r = api.post(f"/v1/images/{d['id']}/segment", json={"boxes": d["boxes"]}, headers={"Accept": "application/x-npz"})
    with np.load(io.BytesIO(r.content)) as out:
        np.testing.assert_array_equal(out["segs"], seg.segment_image(imgs, boxes, "Dermoscopy"))
    store = api.app.state.store
    folder = store.root / d["id"]
    assert (folder / "upload.npz").is_file() and oct(store.root.stat().st_mode & 0o777) == "0o700"
    assert api.delete(f"/v1/images/{d['id']}").status_code == 204
    assert not folder.exists()
    for r in (api.get(f"/v1/images/{d['id']}"), api.delete(f"/v1/images/{d['id']}"),
              api.post(f"/v1/images/{d['id']}/segment", json={"boxes": []})):
        assert r.status_code == 404 and "no image with this id" in r.json()["detail"]


def test_volume_propagates_with_cached_slices_and_progress(api, seg):
    d = upload(api, need(SAMPLE / "imgs" / CASE_3D))
    with np.load(SAMPLE / "imgs" / CASE_3D) as case:
        vol = case["imgs"]
    assert d["dims"] == 3 and d["shape"] == list(vol.shape) and d["modality"] == "MR"
    iid = d["id"]
    assert api.get(f"/v1/images/{iid}/progress").json()["state"] == "idle"
    box = [[9, 31, 8, 27, 44, 11]]  # 4 slices: quick on one thread
    ref = seg.segment_volume(vol, box, "MR")
    assert ref.any()
    r = api.post(f"/v1/images/{iid}/segment", json={"boxes": box})  # NPZ is the volume's default
    assert r.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(r.content)) as out:
        np.testing.assert_array_equal(out["segs"], ref)
        np.testing.assert_array_equal(out["spacing"], [1.0, 1.0, 1.0])
    assert api.get(f"/v1/images/{iid}/progress").json() == {"state": "done", "done": 4, "total": 4, "message": ""}
    encoded = seg.engine.stats.items["image_encoder"]
    j = api.post(f"/v1/images/{iid}/segment", json={"boxes": box}, headers={"Accept": "application/json"}).json()
    np.testing.assert_array_equal(from_run_lengths(j["labels"]["rle"], vol.shape), ref)
    assert seg.engine.stats.items["image_encoder"] == encoded, "the volume's slice embeddings were cached"
    assert api.app.state.store.cached_bytes() > 0
    np.testing.assert_array_equal(decode_png(api.get(f"/v1/images/{iid}/slices/10").content), vol[10])
    r = api.get(f"/v1/images/{iid}/slices/{len(vol)}")
    assert r.status_code == 404 and f"(0..{len(vol) - 1})" in r.json()["detail"]
    r = api.post(f"/v1/images/{iid}/segment", json={"boxes": box}, headers={"Accept": "image/png"})
    assert r.status_code == 406 and "application/x-npz" in r.json()["detail"]
    r = api.post(f"/v1/images/{iid}/segment", json={"boxes": [[9, 31, 27, 44]]})
    assert r.status_code == 422 and "[x0, y0, z0, x1, y1, z1]" in r.json()["detail"]
    api.delete(f"/v1/images/{iid}")


def test_nifti_upload_and_download_keep_the_geometry(api, seg, tmp_path):
    pytest.importorskip("SimpleITK", reason="the io extra (SimpleITK) is not installed")
    from mcp_medsam.io import medical

    r = api.post("/v1/images", files={"file": (NIFTI.name, need(NIFTI).read_bytes())})
    assert r.status_code == 422 and "modality" in r.json()["detail"]  # it decides the intensity conversion
    d = upload(api, NIFTI, modality="MR")
    native = medical.read_image(NIFTI)
    assert d["dims"] == 3 and d["shape"] == list(native.shape) and d["spacing"] == list(native.spacing_zyx)
    box = [[9, 31, 12, 27, 44, 14]]
    r = api.post(f"/v1/images/{d['id']}/segment", json={"boxes": box}, headers={"Accept": "application/gzip"})
    assert r.status_code == 200 and 'labels.nii.gz"' in r.headers["content-disposition"]
    (tmp_path / "labels.nii.gz").write_bytes(r.content)
    labels = medical.read_labels(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(labels.array, seg.segment_volume(medical.to_uint8(native, "MR"), box, "MR"))
    assert labels.spacing == pytest.approx(native.spacing) and labels.origin == pytest.approx(native.origin)
    assert labels.direction == pytest.approx(native.direction)
    api.delete(f"/v1/images/{d['id']}")


def test_dicom_series_zip_upload(api):
    pytest.importorskip("SimpleITK", reason="the io extra (SimpleITK) is not installed")
    files = sorted(need(FORMATS / "dicom" / "STS-001-CT" / "image").glob("*.dcm"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f"../../evil/{f.name}")  # member names never become server paths
    r = api.post("/v1/images", files={"file": ("STS-001-CT.zip", buf.getvalue())}, data={"modality": "CT"})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["shape"] == [len(files), 202, 198] and d["spacing"][1:] == pytest.approx([0.976562, 0.976562])
    store = api.app.state.store
    assert not (store.root.parent / "evil").exists() and not (store.root / "evil").exists()
    api.delete(f"/v1/images/{d['id']}")


@pytest.mark.parametrize("rel, modality", [
    ("jpg/cju0qkwl35piu0993l0dewei2_image.jpg", None), ("bmp/IMD003_image.bmp", "Dermoscopy"),
    ("tiff/GOWT1-t01_image.tif", "Microscopy"), ("nrrd/brain1_image.nrrd", "MR"),
    ("dicom/STS-001-CT/image/000030.dcm", "CT"),
])
def test_native_formats_upload_as_the_format_reader_reads_them(api, rel, modality):
    """Each format of the sample set: the stored pixels are mcp_medsam.io.medical's reading and
    conversion of the file (a single DICOM file is a volume one slice deep, as `segment` reads it)."""
    from mcp_medsam.io import medical

    path = need(FORMATS / rel)
    if path.suffix in (".nrrd", ".dcm"):
        pytest.importorskip("SimpleITK", reason="the io extra (SimpleITK) is not installed")
    d = upload(api, path, **({"modality": modality} if modality else {}))
    native = medical.read_image(path)
    expected = medical.to_uint8(native, modality or "XRay")
    assert d["modality"] == modality and d["dims"] == (3 if native.is_3d else 2)
    if native.is_3d:
        assert d["spacing"] == pytest.approx(native.spacing_zyx)  # the order of shape: (z, y, x)
        z = len(expected) // 2
        assert d["shape"] == list(expected.shape)
        np.testing.assert_array_equal(decode_png(api.get(f"/v1/images/{d['id']}/slices/{z}").content), expected[z])
    else:
        assert d["shape"] == list(expected.shape[:2])
        got = decode_png(api.get(f"/v1/images/{d['id']}/slices/0").content)
        np.testing.assert_array_equal(got[:, :, ::-1], expected)  # RGB
    r = api.get(f"/v1/images/{d['id']}/labels")
    assert r.status_code == 404 and "no segmentation of this image yet" in r.json()["detail"]
    api.delete(f"/v1/images/{d['id']}")


# ---------------------------------------------------------------- errors: 4xx with a clear message


@pytest.mark.parametrize("body, status, words", [
    ({"boxes": [[300, 100, 250, 400]]}, 422, "box 1 [300, 100, 250, 400] is inverted"),
    ({"boxes": [[1, 2, 3]]}, 422, "box 1 has 3 numbers; a 2D image takes [x0, y0, x1, y1]"),
    ({"boxes": [[600, 600, 700, 700]]}, 422, "lies wholly outside the image"),
    ({"boxes": [[1, 2, 30, 40]] * 65}, 422, "65 boxes; this server takes at most 64"),
    ({"boxes": [[1, 2, 30, 40]], "modality": "Sonar"}, 422, "unknown modality 'Sonar'; accepted: CT"),
    ({"boxes": "x"}, 422, "boxes: Input should be a valid list"),
    ({"boxes": [["a", 2, 3, 4]]}, 422, "boxes.0.0:"),
    ({"boxes": [[1, 2, 30, 40]], "prompt": 1}, 422, "prompt: Extra inputs are not permitted"),
    ({}, 422, "boxes: Field required"),
])
def test_bad_segment_requests(api, png_image, body, status, words):
    r = api.post(f"/v1/images/{png_image}/segment", json=body)
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_bad_bodies_and_uploads(api, tmp_path):
    iid = upload(api, need(PNG))["id"]  # no modality given, none in the name
    r = api.post(f"/v1/images/{iid}/segment", json={"boxes": [[1, 2, 30, 40]]})
    assert r.status_code == 422 and r.json()["detail"].startswith("no modality: give one in the request or at upload")
    r = api.post(f"/v1/images/{iid}/segment", content=b'{"boxes": [[1, 2', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "the body is not valid JSON" in r.json()["detail"]
    r = api.post(f"/v1/images/{iid}/segment", content=b'{"boxes": [[1, 2, 3, 4]]}')  # no Content-Type
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"]
    api.delete(f"/v1/images/{iid}")

    bad_npz = io.BytesIO()
    np.savez(bad_npz, imgs=np.zeros((8, 8, 3), np.uint8))  # no boxes: not a case
    cases = [
        ({"file": ("scan.gif", b"GIF89a")}, {}, 415, "the file name must end in one of"),
        ({"file": ("scan.mhd", b"ObjectType = Image")}, {}, 415, "send it as one file (.mha or .nrrd)"),
        ({"file": ("scan.png", b"\x89PNG\r\n\x1a\n broken")}, {}, 422, "not a readable PNG file"),
        ({"file": ("case.npz", b"PK\x03\x04 broken")}, {}, 422, "not a readable .npz file"),
        ({"file": ("case.npz", bad_npz.getvalue())}, {}, 422, "missing key(s) boxes"),
        ({"file": ("scan.nii.gz", b"\x1f\x8b not a nifti")}, {"modality": "CT"}, 422, "nifti|scan.nii.gz"),
        ({"file": ("series.zip", b"PK\x03\x04 broken")}, {"modality": "CT"}, 422, "not a readable .zip file"),
        ({"file": ("scan.png", PNG.read_bytes())}, {"modality": "Sonar"}, 422, "unknown modality"),
        ({"file": ("scan.png", PNG.read_bytes())}, {"window": "40"}, 422, "expected LEVEL,WIDTH"),
        ({"file": ("scan.png", PNG.read_bytes())}, {"organ": "lung"}, 422, "unknown form field 'organ'"),
    ]
    for files, data, status, words in cases:
        r = api.post("/v1/images", files=files or None, data=data)
        detail = r.json()["detail"]
        assert r.status_code == status and any(w in detail for w in words.split("|")), (files, r.status_code, detail)
        assert "Traceback" not in detail and "mcp-medsam-serve-" not in detail, detail  # no server paths
    only_field = b'--b\r\nContent-Disposition: form-data; name="modality"\r\n\r\nCT\r\n--b--\r\n'
    r = api.post("/v1/images", content=only_field, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 422 and "no 'file' part in the form" in r.json()["detail"]
    r = api.post("/v1/images", content=b"raw bytes", headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and "expected a multipart/form-data body" in r.json()["detail"]
    store = api.app.state.store
    assert len(folders(store.root)) == len(store), "refused uploads leave no folder behind"


def test_limits_answer_413_and_422(seg, tmp_path):
    with client_for(seg, tmp_path, max_upload_mb=0.1, max_images=1, max_image_mb=0.5) as c:
        r = c.post("/v1/images", files={"file": (PNG.name, PNG.read_bytes())})  # 139 kB > 0.1 MB
        assert r.status_code == 413 and "larger than 0.1 MB (--max-upload-mb)" in r.json()["detail"]

        def chunks():  # no Content-Length: the bytes are counted as they arrive
            body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
                    + PNG.read_bytes() + b"\r\n--b--\r\n")
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        r = c.post("/v1/images", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
        # 512x512 as RGB uint8 is 0.75 MB > 0.5 MB: refused from the PNG header, before decoding.
        small = cv2.imencode(".png", np.zeros((512, 512), np.uint8))[1].tobytes()
        r = c.post("/v1/images", files={"file": ("big.png", small)})
        assert r.status_code == 413 and "(--max-image-mb)" in r.json()["detail"]
        # An NPZ whose imgs header claims 4000^3 voxels: refused without decompressing anything.
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w") as zf:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (4000, 4000, 4000)})
            zf.writestr("imgs.npy", header.getvalue() + b"\0" * 64)
            zf.writestr("boxes.npy", _npy(np.array([[1, 1, 1, 5, 5, 5]])))
        r = c.post("/v1/images", files={"file": ("3DBox_CT_bomb.npz", bomb.getvalue())})
        assert r.status_code == 413 and "imgs is 61035.2 MiB when decompressed" in r.json()["detail"], r.text
        r = c.post("/v1/images/x/segment", content=b"[" + b"1," * 600_000 + b"1]",
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than 1 MB" in r.json()["detail"]
        tiny = cv2.imencode(".png", np.full((64, 64), 100, np.uint8))[1].tobytes()
        first = c.post("/v1/images", files={"file": ("a.png", tiny)})
        assert first.status_code == 201
        r = c.post("/v1/images", files={"file": ("b.png", tiny)})
        assert r.status_code == 413 and "at most 1 images (--max-images)" in r.json()["detail"]
        c.delete(f"/v1/images/{first.json()['id']}")
        assert c.post("/v1/images", files={"file": ("b.png", tiny)}).status_code == 201
        assert len(folders(c.app.state.store.root)) == 1  # refused uploads left nothing behind


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_token_guards_every_api_call(seg, tmp_path):
    with client_for(seg, tmp_path, token="s3cret-token-of-16+") as c:
        assert c.get("/healthz").json() == {"status": "ok", "auth": "bearer"}
        assert c.get("/").status_code == 200  # the page holds no data; it asks for the token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token-of-16+"}):
            r = c.get("/v1/info", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer <token>" in r.json()["detail"]
            r = c.post("/v1/images", files={"file": (PNG.name, PNG.read_bytes())}, headers=headers)
            assert r.status_code == 401
        assert len(c.app.state.store) == 0
        ok = {"Authorization": "Bearer s3cret-token-of-16+"}
        assert c.get("/v1/info", headers=ok).status_code == 200
        r = c.post("/v1/images", files={"file": (PNG.name, PNG.read_bytes())}, headers=ok)
        assert r.status_code == 201
        assert c.get(f"/v1/images/{r.json()['id']}/slices/0").status_code == 401


def test_cors_only_when_asked_for(api, seg, tmp_path):
    origin = {"Origin": "http://viewer.example"}
    assert "access-control-allow-origin" not in api.get("/v1/info", headers=origin).headers
    with client_for(seg, tmp_path, cors_origins=("http://viewer.example",)) as c:
        assert c.get("/v1/info", headers=origin).headers["access-control-allow-origin"] == "http://viewer.example"
        r = c.options("/v1/images", headers={**origin, "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and "POST" in r.headers["access-control-allow-methods"]
        other = c.get("/v1/info", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def test_concurrent_requests_never_share_the_engine(api, seg, png_image, monkeypatch):
    """Eight clients at once: every answer is right, and the model never runs two calls at a time."""
    ref = seg.segment_image(grey(PNG), [[100, 100, 250, 400]], "XRay")
    active, peak, lock = [0], [0], threading.Lock()
    decode = seg.engine.decode

    def counting(feed):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return decode(feed)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(seg.engine, "decode", counting)
    answers = [None] * 8

    def one(i):
        answers[i] = api.post(f"/v1/images/{png_image}/segment", json={"boxes": [[100, 100, 250, 400]]})

    pool = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in pool:
        t.start()
    health = api.get("/healthz")  # answered while the model is busy
    for t in pool:
        t.join()
    assert health.status_code == 200
    for r in answers:
        assert r.status_code == 200
        np.testing.assert_array_equal(decode_png(r.content), ref)
    assert peak[0] == 1


# ---------------------------------------------------------------- the real command


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 180.0):
    """``mcp-medsam serve`` as a real uvicorn process on a free loopback port: (base URL, process).

    Waits for /healthz by polling; stops it with SIGINT (a clean shutdown) at the end."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "serve", "--port", str(port), "--threads", "1",
                             "--log-level", "warning", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log, timeout)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_server(proc)
        log.close()


def test_real_server_with_token(seg, tmp_path):
    import httpx2

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"MCP_MEDSAM_TOKEN": "tok-123-tok-123-tok", "TMPDIR": str(tmp)}
    with running_server("--host", "127.0.0.1", env=env) as (url, proc):
        assert httpx2.get(f"{url}/v1/info").status_code == 401
        auth = {"Authorization": "Bearer tok-123-tok-123-tok"}
        with httpx2.Client(base_url=url, headers=auth, timeout=120) as http:
            assert http.get("/v1/info").json()["modalities"] == list(seg.modalities)
            r = http.post("/v1/images", files={"file": (PNG.name, PNG.read_bytes())}, data={"modality": "XRay"})
            assert r.status_code == 201, r.text
            iid = r.json()["id"]
            [root] = tmp.glob("mcp-medsam-serve-*")
            assert folders(root) == [root / iid]  # the upload's private folder
            r = http.post(f"/v1/images/{iid}/segment", json={"boxes": BOXES})
            np.testing.assert_array_equal(decode_png(r.content), seg.segment_image(grey(PNG), BOXES, "XRay"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert not list(tmp.glob("mcp-medsam-serve-*")), "the uploads were deleted at shutdown"


def test_serve_refuses_a_public_address_without_token():
    env = {"MCP_MEDSAM_TOKEN": ""}
    proc = run_cli("serve", "--host", "0.0.0.0", env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to listen on 0.0.0.0 without a token"), proc.stderr
    proc = run_cli("serve", "--port", "8000", "--cache-mb", "1", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --cache-mb must be at least 64 (two decoder " \
                                                           "batches of slice embeddings)", proc.stderr


def test_serve_bench_reports_zero_errors(tmp_path):
    """The load check's command end to end, briefly (its figures are a benchmark, not asserted)."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in (CASE_2D, "2DBox_US_HC18_000.npz", CASE_3D):  # the 3D case is skipped
        (cases / name).symlink_to(need(SAMPLE / "imgs" / name))
    out = tmp_path / "load.json"
    proc = run_cli("serve-bench", "-i", str(cases), "--clients", "2", "--seconds", "2", "--decodes", "2",
                   "--threads", "1", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["cases"] == 2
    assert set(report["idle"]["kinds"]) == {"upload+embed", "decode", "delete"}
    assert report["idle"]["kinds"]["decode"]["n"] == 4 and report["load"]["requests"] > 0
    assert report["server_peak_rss_mb"] > 100
    assert "req/s" in proc.stdout and "errors 0" in proc.stdout
