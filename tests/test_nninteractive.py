"""nnInteractive's remote-session protocol at /nninteractive, driven by the unmodified PyPI client
(``nninteractive-client``) against a real ``mcp-medsam serve`` process; the wire format's checks
against hostile bodies; the session layer against the Segmenter calls it documents as equivalent."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import pytest

from conftest import REPO, SHARED, need, run_cli

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")
pytest.importorskip("nnInteractive.inference.remote",
                    reason="nninteractive-client is not installed: pip install 'mcp-medsam[dev]'")

import httpx  # noqa: E402
from nnInteractive.inference.remote import (  # noqa: E402
    ServerAtCapacityError,
    SessionExpiredError,
    nnInteractiveRemoteInferenceSession,
)
from nnInteractive.inference.remote.serialization import pack_array, unpack_array  # noqa: E402

from mcp_medsam import Segmenter  # noqa: E402
from mcp_medsam.errors import InputError, TooLarge  # noqa: E402
from mcp_medsam.interactive.session import InteractiveSession, convert, guess_modality  # noqa: E402
from mcp_medsam.io.medical import read_image, to_uint8  # noqa: E402
from mcp_medsam.serve import nninteractive as nni  # noqa: E402
from mcp_medsam.serve.loadcheck import free_port, stop_server, wait_healthy  # noqa: E402

FORMATS = SHARED / "data" / "formats"
NIFTI = FORMATS / "nifti" / "hippocampus_001_image.nii.gz"
CT_NIFTI = FORMATS / "nifti" / "STS-001-CT_image.nii.gz"
PNG = FORMATS / "png" / "CHNCXR-0001-0_image.png"
TOKEN = "nni-test-token-0123456789"
# Hippocampus label 1 (the NPZ case's box: x 9..27, y 31..44) on slice 3 of a 6-slice crop (z 7..12):
# the encoder costs the same per slice whatever its size, so the walks stay short.
BOX_Z = [[3, 4], [31, 45], [9, 28]]


@contextlib.contextmanager
def serving(*args: str):
    """``mcp-medsam serve`` as a real uvicorn process on a free loopback port: (URL of the protocol, log file)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "serve", "--port", str(port), "--threads", "1",
                             "--log-level", "info", *args], cwd=REPO, env={**os.environ, "MCP_MEDSAM_TOKEN": TOKEN},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log, 180)
        yield f"http://127.0.0.1:{port}/nninteractive", log
    finally:
        stop_server(proc)
        log.close()


def log_text(log) -> str:
    log.seek(0)
    return log.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.load(threads=1)


@pytest.fixture(scope="module")
def server():
    with serving("--sessions", "2") as running:
        yield running


def client(url: str, key: str | None = TOKEN) -> nnInteractiveRemoteInferenceSession:
    return nnInteractiveRemoteInferenceSession(url, api_key=key, read_timeout=600)


def sessions_held(url: str) -> int:
    return httpx.get(f"{url}/healthz").json()["sessions"]


def hippocampus() -> np.ndarray:
    return read_image(need(NIFTI)).array  # (z, y, x) uint8 native values, as napari loads the file


def hippocampus_crop() -> np.ndarray:
    return np.ascontiguousarray(hippocampus()[7:13])


# ---------------------------------------------------------------- wire format (no model)


def test_packed_arrays_interoperate_with_the_client():
    a = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5) - 50
    body = pack_array(a)
    got = nni.unpack(body, nni.parse_packed(body, kinds="iuf", ndim=4, max_bytes=10**6))
    np.testing.assert_array_equal(got, a)
    m = (np.arange(60).reshape(3, 4, 5) % 3 == 0).astype(np.uint8)
    np.testing.assert_array_equal(unpack_array(nni.pack(m)), m)


def _lying(a: np.ndarray) -> bytes:
    """A body whose header and chunk table announce one more element along the last axis than the blosc2
    frame holds (a consistent lie the frame header exposes)."""
    body = bytearray(pack_array(a))
    at = 8 + len(a.dtype.name) + 8 * (a.ndim - 1)
    struct.pack_into("<q", body, at, a.shape[-1] + 1)
    pos = at + 8 + 4
    ulen, clen = struct.unpack_from("<QQ", body, pos)
    struct.pack_into("<QQ", body, pos, ulen // a.shape[-1] * (a.shape[-1] + 1), clen)
    return bytes(body)


def test_hostile_bodies_are_refused_before_decompression():
    ok = np.zeros((1, 4, 4, 4), np.float32)
    check = dict(kinds="iuf", ndim=4, max_bytes=10**6)
    with pytest.raises(InputError, match="complex64 is not accepted"):
        nni.parse_packed(pack_array(ok.astype(np.complex64)), **check)
    with pytest.raises(InputError, match="has 5 axes"):
        nni.parse_packed(pack_array(ok[None]), **check)
    with pytest.raises(TooLarge, match="--max-image-mb"):
        nni.parse_packed(pack_array(ok), kinds="iuf", ndim=4, max_bytes=100)
    with pytest.raises(InputError, match="its frame says"):
        nni.parse_packed(_lying(ok), **check)
    # A header that announces a huge shape with a tiny body: refused from the header alone.
    huge = bytearray(pack_array(ok))
    struct.pack_into("<q", huge, 8 + len("float32") + 8, 10**6)
    with pytest.raises(TooLarge):
        nni.parse_packed(bytes(huge), **check)
    with pytest.raises(InputError, match="not a valid packed array"):
        nni.parse_packed(b"NNIA\x01\x01\x04", **check)
    with pytest.raises(InputError, match="bytes after the last chunk"):
        nni.parse_packed(pack_array(ok) + b"x", **check)


# ---------------------------------------------------------------- the session layer (in process)


def test_modality_guess_and_conversion_follow_segment():
    ct, mr = read_image(need(CT_NIFTI)), read_image(need(NIFTI))
    assert guess_modality(ct.array) == "CT" and guess_modality(mr.array) == "MR"
    np.testing.assert_array_equal(convert(ct.array, "CT"), to_uint8(ct, "CT"))
    np.testing.assert_array_equal(convert(mr.array, "MR"), to_uint8(mr, "MR"))
    grey = cv2.imread(str(need(PNG)), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(convert(grey[None], "XRay")[0], grey)  # an 8-bit picture is kept as is


def test_2d_box_on_another_axis_equals_segment_volume_of_the_transposed_volume(seg):
    """A 2D box across axis 2 (x) of a small crop: the walk is segment_volume's, stopped where the mask ends."""
    raw = hippocampus()[:, 28:46, 8:14]  # 35 x 18 x 6: the walk along x has at most 6 slices
    session = InteractiveSession.from_native(segmenter=seg, raw=raw, modality="MR", cache_slices=16)
    oid = session.new_object()
    box = [[6, 17], [0, 18], [3, 4]]  # z 6..16, all of y, on x = 3
    changed = session.add_box(oid, box)
    mask = session.mask(oid)
    assert changed is not None and mask.any()
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    vol_x = np.ascontiguousarray(session.volume.transpose(2, 0, 1))  # (x, z, y): x first, then the slice's rows, cols
    ref = seg.segment_volume(vol_x, [[0, 6, xs[0], 17, 16, xs[-1]]], "MR", starts=[3]) == 1
    np.testing.assert_array_equal(mask, ref.transpose(1, 2, 0))
    assert changed == [[int(v) for v in (np.flatnonzero(mask.any(axis=(1, 2)))[[0, -1]] + [0, 1])],
                       [int(v) for v in (np.flatnonzero(mask.any(axis=(0, 2)))[[0, -1]] + [0, 1])],
                       [int(xs[0]), int(xs[-1]) + 1]]
    # Excluding the same box takes back what it added; undo twice restores the empty object.
    session.add_box(oid, box, include=False)
    assert not session.mask(oid).any()
    assert session.undo(oid)[0] and session.mask(oid).sum() == ref.sum()
    assert session.undo(oid)[0] and not session.mask(oid).any()
    assert session.undo(oid) == (False, None)
    session.close()
    assert not session.objects and session.volume.size == 0


def test_3d_box_and_lasso_follow_segment_volume(seg):
    """A 3D box is segment_volume's own 3D box; a lasso is its bounding box on its slice, as a 2D box."""
    raw = hippocampus_crop()[:4]  # 4 x 51 x 35
    session = InteractiveSession.from_native(segmenter=seg, raw=raw, modality="MR", cache_slices=16)
    boxed, lassoed = session.new_object(), session.new_object()
    session.add_box(boxed, [[0, 4], [31, 45], [9, 28]])
    ref = seg.segment_volume(convert(raw, "MR"), [[9, 31, 0, 27, 44, 3]], "MR") == 1
    assert ref.any()
    np.testing.assert_array_equal(session.mask(boxed), ref)
    ring = np.zeros((1, 14, 19), np.uint8)
    cv2.ellipse(ring[0], (9, 7), (9, 6), 0, 0, 360, 1, -1)  # a filled lasso
    session.add_lasso(lassoed, ring, at=[[2, 3], [31, 45], [9, 28]])
    ys, xs = np.nonzero(ring[0])
    fresh = session.new_object()
    session.add_box(fresh, [[2, 3], [31 + ys.min(), 32 + ys.max()], [9 + xs.min(), 10 + xs.max()]])
    assert session.mask(fresh).any()
    np.testing.assert_array_equal(session.mask(lassoed), session.mask(fresh))
    with pytest.raises(InputError, match="one slice"):
        session.add_lasso(lassoed, np.ones((2, 3, 3), np.uint8), at=[[0, 2], [0, 3], [0, 3]])


# ---------------------------------------------------------------- the real client against a real server


def test_claim_capabilities_and_the_key(server):
    url, _ = server
    with pytest.raises(httpx.HTTPStatusError) as err:
        client(url, key="wrong-key-wrong-key-wrong")
    assert err.value.response.status_code == 401
    with pytest.raises(httpx.HTTPStatusError) as err:
        client(url, key=None)
    assert err.value.response.status_code == 401
    with client(url) as c:
        assert c.supported_interactions == {"points": False, "bbox2d": True, "bbox3d": True, "scribble": False,
                                            "lasso": True}
        assert c.supports_undo and not c.supports_initial_label
        assert "LiteMedSAM" in c.license and c.idle_timeout_seconds == 600 and c.liveness_timeout_seconds == 60
        assert c.ping() and c.lease_status()["remaining_seconds"] > 590
        with pytest.raises(httpx.HTTPStatusError) as err:  # a box-only model: a click is a 400 JSON answer
            c.add_point_interaction([0, 0, 0], include_interaction=True)
        refused = err.value.response
        assert refused.status_code == 400 and "points are not supported" in refused.json()["detail"]


def test_volume_box_undo_reset_release(server, seg):
    """napari's (z, y, x) volume as (1, z, y, x): a 2D box on slice 10 gives segment_volume's mask over the
    slices where the object continues; a second box adds, undo takes it back, reset clears, release frees."""
    url, log = server
    raw = hippocampus_crop()
    before = sessions_held(url)
    c = client(url)
    assert sessions_held(url) == before + 1
    c.set_image(raw[None], {"spacing": [1.0, 1.0, 1.0]})
    assert c.original_image_shape == (1, *raw.shape)
    assert "modality MR (guessed" in log_text(log)
    buf = np.zeros(raw.shape, np.uint8)
    c.set_target_buffer(buf)
    changed = c.add_bbox_interaction(BOX_Z, include_interaction=True)
    first = buf.copy()
    assert changed is not None and first.any() and set(np.unique(first)) == {0, 1}
    zs = np.flatnonzero(first.any(axis=(1, 2)))
    # convert() is segment's conversion (test_modality_guess_and_conversion_follow_segment).
    ref = seg.segment_volume(convert(raw, "MR"), [[9, 31, zs[0], 27, 44, zs[-1]]], "MR", starts=[3]) == 1
    np.testing.assert_array_equal(first.astype(bool), ref)
    # Only the changed sub-volume travelled: its bbox covers the mask exactly.
    assert changed == [[int(zs[0]), int(zs[-1]) + 1],
                       [int(v) for v in np.flatnonzero(first.any(axis=(0, 2)))[[0, -1]] + [0, 1]],
                       [int(v) for v in np.flatnonzero(first.any(axis=(0, 1)))[[0, -1]] + [0, 1]]]
    # The same box excluded removes it all; undo brings it back in the client's buffer.
    c.add_bbox_interaction(BOX_Z, include_interaction=False)
    assert not buf.any()
    assert c.undo() is True
    np.testing.assert_array_equal(buf, first)
    c.reset_interactions()
    assert not buf.any()
    assert c.undo() is False  # reset leaves nothing to undo
    c.add_bbox_interaction(BOX_Z, include_interaction=True, run_prediction=False)
    assert not buf.any()
    assert c._predict() is not None
    np.testing.assert_array_equal(buf, first)  # the same box on the embedded slices again: the same mask
    c.close()
    assert sessions_held(url) == before


def test_2d_image_as_a_one_slice_volume(server, seg):
    url, _ = server
    grey = cv2.imread(str(need(PNG)), cv2.IMREAD_GRAYSCALE)
    with client(url) as c:
        c.set_image(grey[None, None])  # (1, 1, H, W)
        buf = np.zeros((1, *grey.shape), np.uint8)
        c.set_target_buffer(buf)
        c.add_bbox_interaction([[0, 1], [150, 301], [180, 301]], include_interaction=True)
    # The modality was guessed (MR: no value below -500) and an 8-bit picture is taken as it is.
    ref = seg.segment_image(grey, [[180, 150, 300, 300]], "MR") == 1
    assert ref.any()
    np.testing.assert_array_equal(buf[0].astype(bool), ref)


def test_bad_requests_are_4xx_json(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
        assert http.post("/add_bbox_interaction", json={}).status_code == 410  # no lease
        lease = http.post("/claim").json()["lease_token"]
        http.headers["X-Lease-Token"] = lease
        img = np.zeros((1, 8, 8, 8), np.float32)
        cases = {
            "complex": (pack_array(img.astype(np.complex64)), 422),
            "5D": (pack_array(img[None]), 422),
            "two channels": (pack_array(np.zeros((2, 8, 8, 8), np.float32)), 422),
            "lying sizes": (_lying(img), 422),
            "huge shape": (pack_array(np.zeros((1, 1, 1, 1), np.uint8)).replace(
                struct.pack("<4q", 1, 1, 1, 1), struct.pack("<4q", 1, 4096, 4096, 4096)), 413),
            "garbage": (b"not an array at all", 422),
        }
        for name, (body, status) in cases.items():
            r = http.post("/set_image", content=body, headers={"X-Meta": "{}", "Content-Type": nni.OCTET})
            assert r.status_code == status, (name, r.text)
            assert isinstance(r.json()["detail"], str), name
        r = http.post("/add_bbox_interaction", json={"bbox_coords": [[0, 1], [0, 4], [0, 4]],
                                                     "include_interaction": True})
        assert r.status_code == 409 and "set_image" in r.json()["detail"]
        ok = http.post("/set_image", content=pack_array(img + np.arange(8, dtype=np.float32)),
                       headers={"X-Meta": json.dumps({"image_properties": {}}), "Content-Type": nni.OCTET})
        assert ok.status_code == 200, ok.text
        r = http.post("/set_target_buffer", json={"shape": [8, 8, 9], "dtype": "uint8"})
        assert r.status_code == 422 and "[8, 8, 8]" in r.json()["detail"]
        r = http.post("/add_point_interaction", json={"coordinates": [1, 2, 3], "include_interaction": True})
        assert r.status_code == 400 and "points are not supported" in r.json()["detail"]
        assert http.post("/release").json() == {"released": True}
        assert http.post("/heartbeat").status_code == 410


def test_capacity_expiry_and_freeing():
    """One session at most; a client that stops sending is reaped after the liveness timeout (polled with
    a deadline), its next call raises SessionExpiredError, and its place is free again."""
    with serving("--sessions", "1", "--session-liveness-s", "1", "--session-idle-s", "2") as (url, log):
        first = client(url)
        with pytest.raises(ServerAtCapacityError):
            client(url)
        deadline = time.monotonic() + 60
        while True:  # lease_status does not count as a sign of life
            try:
                first.lease_status()
            except SessionExpiredError:
                break
            assert time.monotonic() < deadline, "the lease was never reaped"
            time.sleep(0.2)
        with pytest.raises(SessionExpiredError):
            first.set_target_buffer(np.zeros((2, 2, 2), np.uint8))
        assert sessions_held(url) == 0 and "reaped" in log_text(log)
        second = client(url)
        second.close()


def test_serve_modality_option(seg, tmp_path, caplog):
    """--modality: the sessions' modality and that of /v1 uploads naming none; an unknown one stops serve."""
    from fastapi.testclient import TestClient

    from mcp_medsam.serve import ServeConfig
    from mcp_medsam.serve.app import create_app

    config = ServeConfig(temp_dir=tmp_path, modality="XRay")
    with TestClient(create_app(segmenter=seg, config=config), base_url="http://127.0.0.1") as api:
        with open(need(PNG), "rb") as f:
            r = api.post("/v1/images", files={"file": ("chest.png", f)})
        assert r.status_code == 201 and r.json()["modality"] == "XRay", r.text
        lease = api.post("/nninteractive/claim").json()["lease_token"]
        tiny = np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4) - 1000  # below -500: CT, were it guessed
        caplog.set_level(logging.INFO, logger="mcp_medsam.serve")
        r = api.post("/nninteractive/set_image", content=pack_array(tiny + 1500 * (np.arange(4) > 1)),
                     headers={"X-Lease-Token": lease, "X-Meta": "{}", "Content-Type": nni.OCTET})
        assert r.status_code == 200, r.text
        assert "modality XRay (--modality)" in caplog.text
        assert api.get("/nninteractive/healthz").json()["sessions"] == 1
    proc = run_cli("serve", "--modality", "Ultrasonic", "--port", str(free_port()), timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: unknown modality 'Ultrasonic'; accepted: CT"), proc.stderr
