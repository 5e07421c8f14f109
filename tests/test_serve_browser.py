"""The web page in a real browser: Debian's chromium, headless, driven by Playwright, against the real
``mcp-medsam serve`` process. Boxes are drawn with the mouse; the page's labels (and its overlay
pixels) are compared with :meth:`Segmenter.segment_image` / ``segment_volume`` on the same input.

Needs ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the ``playwright``
package (dev extra); Playwright's own browser download is not used.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SHARED, need

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")

from test_serve_api import running_server  # noqa: E402

from mcp_medsam import Segmenter  # noqa: E402

PNG = SHARED / "data" / "formats" / "png" / "CHNCXR-0001-0_image.png"
NIFTI = SHARED / "data" / "formats" / "nifti" / "hippocampus_001_image.nii.gz"
SCREENSHOT = Path("/tmp/mcp-medsam-serve-screenshot.png")
TOKEN = "browser-test-token"
# The network is closed: no background connections, no first-run work, no sandbox (root in CI).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.load(threads=1)


@pytest.fixture(scope="module")
def server():
    with running_server(env={"MCP_MEDSAM_TOKEN": TOKEN}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # bypass_csp: Playwright's waits evaluate strings, which the page's Content-Security-Policy forbids.
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{server}/#token={TOKEN}")  # the fragment never reaches the server
    pg.wait_for_function("window.mcpMedsam && window.mcpMedsam.ready && window.mcpMedsam.info")
    yield pg
    assert not errors, errors
    context.close()


def open_file(pg, path: Path, modality: str) -> None:
    pg.select_option("#modality", modality)
    pg.set_input_files("#file", str(path))
    pg.wait_for_function("window.mcpMedsam.image && window.mcpMedsam.slices.size > 0")


def to_page(pg, shape: tuple[int, int], x: int, y: int) -> tuple[float, float]:
    """The page position of image pixel (x, y)'s centre, from where the canvas lies on the screen."""
    r = pg.locator("#boxes").bounding_box()
    h, w = shape
    return r["x"] + (x + 0.5) * r["width"] / w, r["y"] + (y + 0.5) * r["height"] / h


def to_image(pg, shape: tuple[int, int], px: float, py: float) -> tuple[int, int]:
    """What the page must make of a page position: the image pixel under it."""
    r = pg.locator("#boxes").bounding_box()
    h, w = shape
    return math.floor((px - r["x"]) * w / r["width"]), math.floor((py - r["y"]) * h / r["height"])


def drag(pg, start: tuple[float, float], end: tuple[float, float]) -> None:
    pg.mouse.move(*start)
    pg.mouse.down()
    pg.mouse.move(*end, steps=8)
    pg.mouse.up()


def settled(pg, applied: int) -> None:
    pg.wait_for_function(f"window.mcpMedsam.applied >= {applied} && !window.mcpMedsam.pending "
                         f"&& !window.mcpMedsam.dirty", timeout=120_000)


def page_labels(pg) -> np.ndarray:
    shape = pg.evaluate("window.mcpMedsam.labelShape")
    return np.array(pg.evaluate("Array.from(window.mcpMedsam.labels)"), np.uint16).reshape(shape)


def overlay_alpha(pg, x: int, y: int) -> int:
    return pg.evaluate(f"document.getElementById('overlay').getContext('2d').getImageData({x}, {y}, 1, 1).data[3]")


def test_draw_move_delete_a_box_on_a_png(page, seg, tmp_path):
    img = cv2.imread(str(need(PNG)), cv2.IMREAD_GRAYSCALE)
    shape = img.shape
    open_file(page, PNG, "XRay")
    assert page.evaluate("window.mcpMedsam.image.shape") == list(shape)

    # Draw: press at one pixel's centre, release at another's; the box is those two pixels, inclusive.
    a, b = to_page(page, shape, 100, 120), to_page(page, shape, 250, 400)
    drag(page, a, b)
    settled(page, 1)
    box = [*to_image(page, shape, *a), *to_image(page, shape, *b)]
    assert box == [100, 120, 250, 400]
    assert page.evaluate("window.mcpMedsam.boxes") == [dict(zip(("x0", "y0", "x1", "y1"), box))]
    ref = seg.segment_image(img, [box], "XRay")
    labels = page_labels(page)
    assert ref.sum() > 1000
    np.testing.assert_array_equal(labels, ref)
    ys, xs = np.nonzero(ref)
    inside = (int(xs[len(xs) // 2]), int(ys[len(ys) // 2]))
    outside = (5, 5)
    assert ref[outside[1], outside[0]] == 0
    assert overlay_alpha(page, *inside) > 0 and overlay_alpha(page, *outside) == 0  # the overlay shows the mask
    page.screenshot(path=str(tmp_path / "serve-page.png"))
    shutil.copy(tmp_path / "serve-page.png", SCREENSHOT)
    print(f"\nscreenshot: {tmp_path / 'serve-page.png'} (copied to {SCREENSHOT})")

    # Download the label PNG (values 1..N), and beside it a colour one to look at.
    with page.expect_download() as dl:
        page.click("#download")
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    assert saved.name == "CHNCXR-0001-0_image_labels.png"
    np.testing.assert_array_equal(cv2.imread(str(saved), cv2.IMREAD_UNCHANGED), ref)
    page.select_option("#download-format", "image/png;colour")
    with page.expect_download() as dl:
        page.click("#download")
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    assert saved.name == "CHNCXR-0001-0_image_labels_colour.png"
    from mcp_medsam.overlay import label_colour

    bgr = cv2.imread(str(saved), cv2.IMREAD_COLOR)
    assert (bgr[ref == 1] == label_colour(1)).all() and (bgr[ref == 0] == 0).all()

    # Move: drag from inside the box by (+30, -20) pixels; the mask follows the new box.
    start = to_page(page, shape, 180, 260)
    drag(page, start, to_page(page, shape, 210, 240))
    settled(page, 2)
    moved = [box[0] + 30, box[1] - 20, box[2] + 30, box[3] - 20]
    assert page.evaluate("window.mcpMedsam.boxes") == [dict(zip(("x0", "y0", "x1", "y1"), moved))]
    np.testing.assert_array_equal(page_labels(page), seg.segment_image(img, [moved], "XRay"))

    # Delete: the box is selected (it was just moved); the Delete key removes it and clears the overlay.
    page.locator("#boxes").press("Delete")
    settled(page, 3)
    assert page.evaluate("window.mcpMedsam.boxes") == [] and page.evaluate("window.mcpMedsam.labels") is None
    assert overlay_alpha(page, *inside) == 0


def test_a_picture_without_modality_asks_for_one_before_the_first_box(page, seg):
    """A PNG carries no modality: with "(from the upload)" the page asks for one, draws no box until it
    has one, and then segments as usual. The header says what precision runs and how weights are stored."""
    info = page.evaluate("window.mcpMedsam.info.model")
    assert f"runs {info['runs_at']} · weights stored as {info['precision']}" in page.text_content("#model")
    img = cv2.imread(str(need(PNG)), cv2.IMREAD_GRAYSCALE)
    open_file(page, PNG, "")
    assert page.evaluate("window.mcpMedsam.needsModality") is True
    assert "pick one in the Modality list" in page.text_content("#status")
    drag(page, to_page(page, img.shape, 100, 120), to_page(page, img.shape, 250, 400))
    assert page.evaluate("window.mcpMedsam.boxes") == [] and page.evaluate("window.mcpMedsam.error") is None
    assert "pick one in the Modality list" in page.text_content("#status")
    page.select_option("#modality", "XRay")
    assert page.evaluate("window.mcpMedsam.needsModality") is False
    drag(page, to_page(page, img.shape, 100, 120), to_page(page, img.shape, 250, 400))
    settled(page, 1)
    np.testing.assert_array_equal(page_labels(page), seg.segment_image(img, [[100, 120, 250, 400]], "XRay"))


def test_draw_and_propagate_on_a_nifti_volume(page, seg, tmp_path):
    pytest.importorskip("SimpleITK", reason="the io extra (SimpleITK) is not installed")
    from mcp_medsam.io import medical

    native = medical.read_image(need(NIFTI))
    vol = medical.to_uint8(native, "MR")
    d, h, w = vol.shape
    open_file(page, NIFTI, "MR")
    assert page.evaluate("window.mcpMedsam.image.dims") == 3
    page.locator("#slice").fill("13")
    page.wait_for_function("window.mcpMedsam.z === 13")
    drag(page, to_page(page, (h, w), 9, 31), to_page(page, (h, w), 27, 44))
    page.wait_for_function("window.mcpMedsam.boxes.length === 1")
    for i, value in ((0, "12"), (1, "14")):  # the box's first and last slice (the list is redrawn each time)
        field = page.locator("#box-list input").nth(i)
        field.fill(value)
        field.dispatch_event("change")
    assert page.evaluate("window.mcpMedsam.boxes") == [{"x0": 9, "y0": 31, "x1": 27, "y1": 44, "z0": 12, "z1": 14}]
    page.click("#propagate")
    settled(page, 1)
    ref = seg.segment_volume(vol, [[9, 31, 12, 27, 44, 14]], "MR")
    assert ref[12:15].any() and not ref[:12].any() and not ref[15:].any()
    np.testing.assert_array_equal(page_labels(page), ref)
    assert "Propagated 1 box" in page.text_content("#status")

    # The slider shows each slice's part of the result.
    page.locator("#slice").fill("12")
    page.wait_for_function("window.mcpMedsam.z === 12")
    ys, xs = np.nonzero(ref[12])
    assert overlay_alpha(page, int(xs[0]), int(ys[0])) > 0

    # Download as NIfTI (the default for a volume here): the upload's geometry, the page's labels.
    assert page.locator("#download-format").input_value() == "application/gzip"
    with page.expect_download() as dl:
        page.click("#download")
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    assert saved.name == "hippocampus_001_image_labels.nii.gz"
    labels = medical.read_labels(saved)
    np.testing.assert_array_equal(labels.array, ref)
    assert labels.spacing == pytest.approx(native.spacing) and labels.origin == pytest.approx(native.origin)


def test_the_page_works_on_a_token_less_server(browser, seg):
    """Without a token the server answers loopback Host names and its own page's Origin only: the page
    (opened as http://localhost:PORT/, posting multipart uploads and JSON) is that page."""
    img = cv2.imread(str(need(PNG)), cv2.IMREAD_GRAYSCALE)
    with running_server(env={"MCP_MEDSAM_TOKEN": ""}) as (url, _):
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
        pg = context.new_page()
        pg.goto(url.replace("127.0.0.1", "localhost") + "/")
        pg.wait_for_function("window.mcpMedsam && window.mcpMedsam.ready && window.mcpMedsam.info")
        assert pg.is_hidden("#token-field")
        open_file(pg, PNG, "XRay")
        drag(pg, to_page(pg, img.shape, 100, 120), to_page(pg, img.shape, 250, 400))
        settled(pg, 1)
        np.testing.assert_array_equal(page_labels(pg), seg.segment_image(img, [[100, 120, 250, 400]], "XRay"))
        context.close()


def test_page_reports_a_wrong_token(browser, server):
    context = browser.new_context(bypass_csp=True)
    pg = context.new_page()
    pg.goto(f"{server}/#token=wrong")
    pg.wait_for_function("window.mcpMedsam && window.mcpMedsam.ready")
    assert pg.is_visible("#token-field")
    assert "wrong token" in pg.text_content("#status") and pg.get_attribute("#status", "class") == "error"
    context.close()
