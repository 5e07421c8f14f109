"""napari-nninteractive in Remote mode against a real ``mcp-medsam serve``: the plug-in's own widget
claims a session, uploads the volume, a box is added to its box layer as a user's drag adds it, and
the plug-in's label layer receives the mask. Needs a display (Xvfb: ``xvfb-run``), napari with a Qt
binding, napari-nninteractive and pytest-qt (the ``napari`` extra); skips with the reason otherwise.

MCP_MEDSAM_NAPARI_SCREENSHOT=PATH keeps a screenshot of the viewer (the README's picture)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import SHARED, need

for module, why in (("napari", "napari"), ("napari_nninteractive", "napari-nninteractive"), ("pytestqt", "pytest-qt"),
                    ("nnInteractive.inference.remote", "nninteractive-client")):
    pytest.importorskip(module, reason=f"{why} is not installed: pip install 'mcp-medsam[napari]'")
if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
    pytest.skip("no display: run under xvfb-run (apt-get install xvfb)", allow_module_level=True)

from test_nninteractive import TOKEN, hippocampus_crop, serving  # noqa: E402

NIFTI = SHARED / "data" / "formats" / "nifti" / "hippocampus_001_image.nii.gz"


def test_napari_remote_mode_box_fills_the_label_layer(qtbot):
    import napari
    from napari_nninteractive import nnInteractiveWidget

    need(NIFTI)
    volume = hippocampus_crop()  # (z, y, x) native values, 6 slices
    with serving("--sessions", "2") as (url, log):
        viewer = napari.Viewer(show=True)
        try:
            viewer.add_image(volume, name="hippocampus")
            widget = nnInteractiveWidget(viewer)
            viewer.window.add_dock_widget(widget, name="nnInteractive")
            assert widget._remote_mode, "a client-only install runs in Remote mode"
            widget.server_url_edit.setText(url)
            widget.api_key_edit.setText(TOKEN)
            widget.on_init()
            # Claim and upload run on worker threads; once the image is on the server the widget selects its
            # first tool the model supports (the box: points are greyed out) and makes that tool's layer.
            qtbot.waitUntil(lambda: widget.bbox_layer_name in viewer.layers, timeout=300_000)
            assert widget.session.supported_interactions["points"] is False
            assert "LiteMedSAM" in widget.session.license
            viewer.dims.set_current_step(0, 3)
            boxes = viewer.layers[widget.bbox_layer_name]
            corners = np.array([[3, 31, 9], [3, 31, 27], [3, 44, 27], [3, 44, 9]], float)
            boxes.add(corners, shape_type="rectangle")  # a drag on slice 3 ends in this call; its data event sends it
            labels = viewer.layers[widget.label_layer_name]
            qtbot.waitUntil(lambda: bool(np.any(labels.data)), timeout=300_000)
            got = np.asarray(labels.data)
            assert got.shape == volume.shape and got[3].any()
            shot = os.environ.get("MCP_MEDSAM_NAPARI_SCREENSHOT")
            if shot:
                viewer.screenshot(shot, canvas_only=False)
            widget._release_session()
        finally:
            viewer.close()
