"""Clicks on the web page (Playwright driving Debian's chromium against a real `mcp-medsam serve` process with the
tiny export): a left click on the selected box adds a foreground click, a right click a background one, Undo
takes the last back; each time the page's labels equal the array API's for the same box and clicks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import need

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mcp-medsam[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")

from test_serve_api import running_server  # noqa: E402
from test_serve_browser import (CHROMIUM_ARGS, PNG, TOKEN, chromium_path, drag, open_file, page_labels,  # noqa: E402
                                settled, to_page)



def test_clicks_on_the_page_equal_the_api(tiny, tiny_export):
    img = cv2.imread(str(need(PNG)), cv2.IMREAD_GRAYSCALE)
    shape = img.shape
    with running_server("--weights", str(tiny_export), env={"MCP_MEDSAM_TOKEN": TOKEN}) as (url, _), \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(f"{url}/#token={TOKEN}")
        pg.wait_for_function("window.mcpMedsam && window.mcpMedsam.ready && window.mcpMedsam.info")
        open_file(pg, PNG, "XRay")
        box = [100, 120, 250, 400]
        drag(pg, to_page(pg, shape, 100, 120), to_page(pg, shape, 250, 400))
        settled(pg, 1)
        plain = tiny.segment_image(img, [box], "XRay")
        np.testing.assert_array_equal(page_labels(pg), plain)

        pg.mouse.click(*to_page(pg, shape, 170, 300))  # left, on the selected box: foreground
        settled(pg, 2)
        fg = tiny.segment_image(img, [box], "XRay", points=[[[170, 300]]], point_labels=[[1]])
        assert not np.array_equal(fg, plain)
        np.testing.assert_array_equal(page_labels(pg), fg)

        pg.mouse.click(*to_page(pg, shape, 120, 140), button="right")  # background
        settled(pg, 3)
        both = tiny.segment_image(img, [box], "XRay", points=[[[170, 300], [120, 140]]], point_labels=[[1, 0]])
        np.testing.assert_array_equal(page_labels(pg), both)
        assert pg.evaluate("window.mcpMedsam.boxes") == [dict(zip(("x0", "y0", "x1", "y1"), box))]

        pg.click("#undo-click")
        settled(pg, 4)
        np.testing.assert_array_equal(page_labels(pg), fg)
        assert not errors, errors
        context.close()
        browser.close()
