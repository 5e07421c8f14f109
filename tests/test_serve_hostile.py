"""``mcp-medsam serve`` against hostile and careless clients, over real sockets to a real uvicorn process:
windows that are not numbers, foreign Host and Origin headers, clients that stall or vanish mid-body,
a shutdown with requests in flight, servers killed before they could clean up, the logs they leave.

Every wait is a poll with a bounded deadline; no assertion rests on a sleep.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, SHARED, need, run_cli

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")

from mcp_medsam.serve.loadcheck import free_port, stop_server, wait_healthy  # noqa: E402

PNG = SHARED / "data" / "formats" / "png" / "CHNCXR-0001-0_image.png"
DICOM = SHARED / "data" / "formats" / "dicom" / "STS-001-CT" / "image"
BOUNDARY = "hostile-boundary"
DEADLINE = 60.0  # seconds any poll below may take before the test fails


@contextlib.contextmanager
def server_process(tmp: Path, *args: str, env: dict | None = None):
    """``mcp-medsam serve`` on a free loopback port with its log in ``tmp/server.log``: (port, process, log path)."""
    port = free_port()
    log_path = tmp / "server.log"
    (tmp / "tmp").mkdir(exist_ok=True)
    with open(log_path, "w+b") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "serve", "--port", str(port), "--threads", "1",
                                 *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(tmp / "tmp"), "MCP_MEDSAM_TOKEN": "", **(env or {})})
        try:
            wait_healthy(proc, port, log, 180)
            yield port, proc, log_path
        finally:
            stop_server(proc)


def log_text(path: Path) -> str:
    return path.read_text("utf-8", "replace")


def poll(condition, what: str, deadline: float = DEADLINE):
    """condition()'s first true value, polled until ``deadline`` seconds have passed (then the test fails)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling interval, not an assertion
    pytest.fail(f"not within {deadline:.0f} s: {what}")


def multipart(fields: dict[str, str], filename: str, data: bytes) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            host: str | None = None) -> tuple[int, dict, bytes]:
    """One request on its own connection, with the Host header as given (default 127.0.0.1:port)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def upload(port: int, fields: dict[str, str], filename: str = "scan.png", data: bytes | None = None,
           headers: dict | None = None, host: str | None = None) -> tuple[int, dict]:
    body = multipart(fields, filename, need(PNG).read_bytes() if data is None else data)
    status, _, answer = request(port, "POST", "/v1/images", body,
                                {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}, host)
    return status, json.loads(answer)


def stalled_upload(port: int, *, length: int = 200_000) -> socket.socket:
    """A client that sends an upload's headers and its first 100 bytes, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    head = (f"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    s.sendall(head + multipart({}, "scan.png", b"\0" * 200)[:100])
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: DEADLINE)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def images_held(port: int) -> int:
    return json.loads(request(port, "GET", "/v1/info")[2])["images"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A token-less server with small limits and a short body timeout, logging at info level."""
    tmp = tmp_path_factory.mktemp("hostile")
    with server_process(tmp, "--max-images", "3", "--max-image-mb", "8", "--body-timeout", "3",
                        "--allowed-host", "viewer.lan", "--log-level", "info") as (port, proc, log):
        yield port, log


# ---------------------------------------------------------------- issue 20, item 5


@pytest.mark.parametrize("window, words", [
    ("0,inf", "numbers must be finite"), ("-inf,5", "numbers must be finite"), ("nan,40", "numbers must be finite"),
    ("40,0", "WIDTH > 0"), ("40,-400", "WIDTH > 0"), ("40", "expected LEVEL,WIDTH"),
])
def test_windows_that_are_not_finite_positive_numbers_are_422(server, window, words):
    port, _ = server
    status, answer = upload(port, {"modality": "XRay", "window": window})
    assert status == 422 and words in answer["detail"] and "the form field 'window'" in answer["detail"], answer
    assert images_held(port) == 0


# ---------------------------------------------------------------- item 6: sizes before decoding


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_dicom_zip_is_refused_from_its_headers_before_decoding(server):
    """Rows and Columns patched to 65535 (4 GiB a slice): 413 from the headers, nothing decoded."""
    pytest.importorskip("SimpleITK", reason="the io extra (SimpleITK) is not installed")
    port, _ = server
    members = {}
    for f in sorted(need(DICOM).glob("*.dcm"))[:3]:
        data = bytearray(f.read_bytes())
        for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):  # (0028,0010) Rows, (0028,0011) Columns
            at = data.find(tag + b"\x02\x00\x00\x00")  # implicit VR little endian, 2 bytes
            assert at > 0
            data[at + 8:at + 10] = b"\xff\xff"
        members[f.name] = bytes(data)
    status, answer = upload(port, {"modality": "CT"}, "series.zip", zipped(members))
    assert status == 413 and "65535x65535x1" in answer["detail"] and "(--max-image-mb)" in answer["detail"], answer
    assert images_held(port) == 0


def tiff_header(width: int, height: int, bits: int) -> bytes:
    """A little-endian TIFF whose one IFD declares a grey width x height picture and holds no pixels."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, height), (279, 4, width * height * bits // 8)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd


def test_pictures_are_refused_from_their_headers_before_decoding(server):
    """A 16000 x 16000 16-bit TIFF (a 1 MB file could be one) is refused from its header: 413, not decoded."""
    port, _ = server
    status, answer = upload(port, {"modality": "Microscopy"}, "cells.tif", tiff_header(16000, 16000, 16))
    assert status == 413 and "16000x16000" in answer["detail"] and "(--max-image-mb)" in answer["detail"], answer


def test_a_header_naming_another_file_is_refused(server):
    """An NRRD whose header names a server file for its data: refused, and no byte of that file comes back."""
    pytest.importorskip("SimpleITK", reason="the io extra (SimpleITK) is not installed")
    port, _ = server
    secret = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path(__file__)
    header = (f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 1\nencoding: raw\n"
              f"data file: {secret}\n\n").encode()
    status, answer = upload(port, {"modality": "MR"}, "scan.nrrd", header)
    assert status == 422 and "data file" in answer["detail"], answer
    assert secret.read_text().strip()[:16] not in json.dumps(answer)
    assert images_held(port) == 0


def test_zip_extraction_stops_at_its_limit(server, tmp_path):
    """A .zip that unpacks beyond 2 x --max-image-mb (8 MB here) is refused while it unpacks, and never
    has more than the limit on disk (counted as written)."""
    from mcp_medsam.serve.uploads import UploadTooLarge, _unzip_series

    port, _ = server
    bomb = zipped({f"{i}.dcm": bytes(7 << 20) for i in range(3)})  # 21 MB of zeros in ~60 kB
    status, answer = upload(port, {"modality": "CT"}, "series.zip", bomb)
    assert status == 413 and "the .zip's files" in answer["detail"], answer
    (tmp_path / "up.zip").write_bytes(bomb)
    with pytest.raises(UploadTooLarge):
        _unzip_series(tmp_path / "up.zip", max_bytes=16 << 20)
    written = sum(p.stat().st_size for p in (tmp_path / "series").iterdir())
    assert 14 << 20 <= written <= 16 << 20


# ---------------------------------------------------------------- item 8: Host and Origin


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "0.0.0.0", ""])
def test_foreign_host_names_are_refused(server, host):
    port, _ = server
    for path in ("/v1/info", "/", "/healthz"):
        status, headers, body = request(port, "GET", path, host=host)
        assert status == 400 and headers["content-type"] == "application/json", (path, status)
        assert "--allowed-host" in json.loads(body)["detail"]
    status, answer = upload(port, {"modality": "XRay"}, host=f"{host}:{port}")
    assert status == 400 and images_held(port) == 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LocalHost", "viewer.lan"])
def test_loopback_names_and_allowed_hosts_are_answered(server, host):
    port, _ = server
    status, _, body = request(port, "GET", "/v1/info", host=f"{host}:{port}")
    assert status == 200 and json.loads(body)["limits"]["max_images"] == 3


def test_foreign_origins_are_refused_on_the_api(server):
    """A page elsewhere may post a multipart form without a preflight: it is refused, and stores nothing."""
    port, _ = server
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}"):
        status, answer = upload(port, {"modality": "XRay"}, headers={"Origin": origin})
        assert status == 403 and "another origin" in answer["detail"], (origin, answer)
        status, _, _ = request(port, "GET", "/v1/info", headers={"Origin": origin})
        assert status == 403
        status, _, _ = request(port, "GET", "/nninteractive/", headers={"Origin": origin})
        assert status == 403
    assert images_held(port) == 0
    # The page's own origin (the Host it came from) and requests without an Origin are served.
    status, answer = upload(port, {"modality": "XRay"}, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 201, answer
    assert request(port, "DELETE", f"/v1/images/{answer['id']}")[0] == 204
    assert request(port, "GET", "/healthz", headers={"Origin": "http://evil.example"})[0] == 200  # holds no data


# ---------------------------------------------------------------- item 7: stalled bodies


def test_stalled_uploads_hold_no_place_and_are_dropped(server):
    """Three clients stall mid-body on a server that holds 3 images: a fourth uploads at once, and each
    stalled connection is answered 408 and closed after --body-timeout (3 s here)."""
    port, _ = server
    stalled = [stalled_upload(port) for _ in range(3)]
    try:
        status, answer = upload(port, {"modality": "XRay"})
        assert status == 201, answer
        for s in stalled:
            reply = read_until_closed(s)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"--body-timeout" in reply
        assert request(port, "DELETE", f"/v1/images/{answer['id']}")[0] == 204
    finally:
        for s in stalled:
            s.close()
    assert images_held(port) == 0


def test_uploads_arriving_at_once_are_bounded(server):
    """At most 4 x --max-images uploads arrive at once (12 here): one more is 503 with Retry-After."""
    port, _ = server
    stalled = [stalled_upload(port) for _ in range(12)]
    try:
        poll(lambda: json.loads(request(port, "GET", "/v1/info")[2])["uploads_receiving"] == 12, "12 uploads arriving")
        body = multipart({"modality": "XRay"}, "scan.png", need(PNG).read_bytes())
        status, headers, answer = request(port, "POST", "/v1/images", body,
                                          {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert status == 503 and headers["retry-after"] == "5", answer
        assert "12 uploads are being received already" in json.loads(answer)["detail"]
    finally:
        for s in stalled:
            s.close()
    poll(lambda: json.loads(request(port, "GET", "/v1/info")[2])["uploads_receiving"] == 0, "the places are free")


def test_a_stalled_json_body_is_dropped_too(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(f"POST /v1/images/x/segment HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: 1000\r\n\r\n{{\"boxes\": ".encode())
        assert read_until_closed(s).startswith(b"HTTP/1.1 408")


# ---------------------------------------------------------------- item 9: logs


def test_a_client_that_disconnects_mid_upload_is_one_log_line(server):
    port, log = server
    before = log_text(log)
    s = stalled_upload(port)
    line = f"POST /v1/images from 127.0.0.1:{s.getsockname()[1]}: the client disconnected"
    s.close()
    poll(lambda: line in log_text(log), "the disconnect is logged")
    new = log_text(log)[len(before):]
    assert new.count(line) == 1 and "Traceback" not in new and "Exception" not in new, new
    assert images_held(port) == 0


def test_access_log_shortens_ids_and_keeps_progress_polls_at_debug(server):
    port, log = server
    status, answer = upload(port, {"modality": "XRay"})
    assert status == 201
    iid = answer["id"]
    assert request(port, "GET", f"/v1/images/{iid}/progress")[0] == 200
    assert request(port, "GET", f"/v1/images/{iid}")[0] == 200
    assert request(port, "DELETE", f"/v1/images/{iid}")[0] == 204
    poll(lambda: f'"DELETE /v1/images/{iid[:6]}… HTTP/1.1" 204' in log_text(log), "the DELETE is logged")
    text = log_text(log)
    assert iid not in text and iid[:7] not in text, "a full image id reached the log"
    assert f'"GET /v1/images/{iid[:6]}… HTTP/1.1" 200' in text
    assert f"image {iid[:6]}… .png 512x512" in text  # the app's own line
    assert "/progress" not in text  # polls are logged at debug level


def test_tokens_shorter_than_16_characters_are_refused_at_start():
    proc = run_cli("serve", env={"MCP_MEDSAM_TOKEN": "fifteen-chars.."}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the token has 15 characters; use at least 16"), proc.stderr
    help_text = " ".join(run_cli("serve", "--help", timeout=120).stdout.replace("│", " ").split())
    assert "MCP_MEDSAM_TOKEN" in help_text and "visible to every user in 'ps'" in help_text


# ---------------------------------------------------------------- item 9: killed servers and shutdown


def test_killed_servers_folders_are_removed_and_shutdown_answers_503(tmp_path):
    """A server killed with SIGKILL leaves its upload folder; the next server removes it (and only
    such folders). At shutdown, a request still running after --shutdown-grace gets JSON 503."""
    tmp = tmp_path / "tmp"
    with server_process(tmp_path) as (port, proc, _):
        status, answer = upload(port, {"modality": "XRay"})
        assert status == 201
        [killed] = tmp.glob("mcp-medsam-serve-*")
        assert (killed / answer["id"]).is_dir()
        proc.kill()
        proc.wait(timeout=DEADLINE)
    foreign = tmp / "mcp-medsam-serve-not-ours"  # no owner lock: another program's, kept
    foreign.mkdir()
    live = tmp / "mcp-medsam-serve-live"  # its owner lock held by a live process (this one): kept
    live.mkdir()
    fd = os.open(live / ".owner.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with server_process(tmp_path, "--shutdown-grace", "1", "--log-level", "info") as (port, proc, log):
            assert killed.is_dir() is False and foreign.is_dir() and live.is_dir()
            assert f"removed 1 upload folder(s) left by killed servers: {killed.name}" in log_text(log)
            s = stalled_upload(port)  # still mid-body when the grace period ends
            try:
                poll(lambda: json.loads(request(port, "GET", "/v1/info")[2])["uploads_receiving"] == 1,
                     "the stalled upload reached the app")
                proc.send_signal(signal.SIGINT)
                reply = read_until_closed(s)
            finally:
                s.close()
            assert reply.startswith(b"HTTP/1.1 503"), reply[:300]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["detail"].startswith("the server is shutting down")
            assert proc.wait(timeout=DEADLINE) == 0
            text = log_text(log)
            assert "Traceback" not in text and "CancelledError" not in text, text
            assert "POST /v1/images cut off by the shutdown" in text
    finally:
        os.close(fd)
    assert sorted(tmp.iterdir()) == sorted([foreign, live]), "the server's own folder went at shutdown"
