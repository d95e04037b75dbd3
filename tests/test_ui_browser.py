"""The web app in a real browser (headless Chromium driven by Playwright): upload an image, click
a pixel and see its curve, paint a region and see its curve, run a short removal with its live
loss plot, discover directions and move a strength slider. Every step checks what the server
received (the clicked pixel, the painted region's size) and saves a screenshot of the panel under
the test's temporary folder, which must not be blank. Skipped where Chromium or Playwright is
missing (``.ci/run`` installs both)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import save_rgb
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
from diffgeo.ui import browser as ui  # noqa: E402

if ui.chromium() is None:
    pytest.skip("no chromium on this machine", allow_module_level=True)


def _shot(locator, path: Path) -> None:
    """A screenshot of one panel, refused when it is (nearly) one flat colour."""
    png = locator.screenshot(path=str(path))
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert grey.std() > 5, f"{path.name} looks blank"


def test_click_paint_edit_and_slide_in_a_browser(tiny, tmp_path):
    from diffgeo.ui.app import launch
    from diffgeo.ui.session import Session, display_factor

    image = save_rgb(tmp_path / "photo.png", 16, 16)
    factor = display_factor((16, 16))
    shots = tmp_path / "shots"
    shots.mkdir()
    session = Session(str(tiny), steps=10)
    ran: list[tuple[str, dict]] = []
    run = session.run

    def recording_run(verb: str, **options):
        ran.append((verb, options))
        return run(verb, **options)

    session.run = recording_run  # what each click sent to the verbs
    app, _, url = launch(block=False, session=session)
    try:
        with sync_api.sync_playwright() as p:
            page = ui.open_page(p, url)
            ui.upload(page, image)

            # a click on a pixel: its curve appears, for exactly that pixel
            ui.click_pixel(page, 5, 11, factor)
            ui.wait_value(page, "#clicked textarea", "(5, 11)")
            ui.wait_loaded(page, "#curve-plot img")
            assert ran[-1][0] == "curves" and ran[-1][1]["pixel"] == [(5, 11)]
            ui.click_pixel(page, 15, 0, factor)  # a corner pixel, appended
            ui.wait_value(page, "#clicked textarea", "(5, 11); (15, 0)")
            _shot(page.locator("#curve-plot"), shots / "curves.png")

            # a painted stroke becomes the region mask (and its curve)
            side = 16 * factor
            stroke = [(side * 0.3, side * 0.3), (side * 0.45, side * 0.5), (side * 0.6, side * 0.7)]
            ui.paint(page, "region", (side, side), stroke)
            page.locator("#region-curve").click()
            ui.wait_value(page, "textarea", "region: fluctuation")
            mask = np.asarray(Image.open(ran[-1][1]["mask"])) > 0
            assert mask.shape == (16, 16) and 4 <= mask.sum() <= 120
            rows, cols = np.nonzero(mask)
            assert 3 <= rows.mean() <= 9 and 4 <= cols.mean() <= 11  # along the stroke
            _shot(page.locator("#region"), shots / "region.png")

            # a short removal on that region: the live loss plot and the result
            page.get_by_role("tab", name="Edit (curve matching)").click()
            ui.set_number(page, "iterations", 4)
            page.locator("#edit-run").click()
            ui.wait_loaded(page, "#edit-result img")
            ui.wait_value(page, "#edit-text textarea", "final loss")
            assert ran[-1][0] == "remove" and ran[-1][1]["iterations"] == 4
            page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for()
            _shot(page.locator("#edit-result"), shots / "edit.png")

            # directions of the region, then a strength slider moves the edit
            page.get_by_role("tab", name="Region directions (RBE)").click()
            page.locator("#discover").click()
            page.locator("#strength-0 input[type=range]").wait_for()
            ui.wait_value(page, "textarea", "singular values")
            ui.slide_to(page, "strength-0", 0.8)
            ui.wait_loaded(page, "#rbe-result img")
            assert ran[-1][0] == "apply" and ran[-1][1]["strength"][0] > 10
            ui.wait_value(page, "textarea", "change inside")
            _shot(page.locator("#rbe-result"), shots / "rbe.png")
            page.context.browser.close()
    finally:
        app.close()
        session.close()
