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
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import save_rgb
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine", allow_module_level=True)

TIMEOUT_MS = 60_000


def _shot(locator, path: Path) -> None:
    """A screenshot of one panel, refused when it is (nearly) one flat colour."""
    png = locator.screenshot(path=str(path))
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert grey.std() > 5, f"{path.name} looks blank"


def _loaded(page, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && "
        "i.naturalWidth > 0 }", arg=selector, timeout=TIMEOUT_MS)


def _click_pixel(page, row: int, col: int, factor: int) -> None:
    """Click image pixel (row, col) on the shown copy, enlarged ``factor`` times (Gradio maps
    a click by the shown scale r = min(box / natural, 1), the image centred in its box)."""
    img = page.locator("#image img")
    nat_w, nat_h = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    box = img.bounding_box()
    r = min(box["width"] / nat_w, box["height"] / nat_h, 1)
    ox, oy = (box["width"] - nat_w * r) / 2, (box["height"] - nat_h * r) / 2
    img.click(position={"x": ox + (col + 0.5) * factor * r, "y": oy + (row + 0.5) * factor * r})


def _paint(page, elem_id: str, size: int, points: list[tuple[float, float]]) -> None:
    """A brush stroke through ``points`` (row, col) of the editor's background (``size``
    pixels square), drawn centred in the canvas at the editor's zoom."""
    zoom = float(page.locator(f"#{elem_id} .zoom-number span").inner_text().strip()
                 .rstrip("%")) / 100
    box = page.locator(f"#{elem_id} .pixi-target canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def screen(row: float, col: float) -> tuple[float, float]:
        return cx + (col + 0.5 - size / 2) * zoom, cy + (row + 0.5 - size / 2) * zoom

    page.mouse.move(*screen(*points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*screen(*p))
    page.mouse.up()


def _wait_value(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => [...document.querySelectorAll(s)]"
                           ".some(e => e.value.includes(t))", arg=[selector, text],
                           timeout=TIMEOUT_MS)


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
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#upload").locator("xpath=..").locator(
                "input[type=file]").set_input_files(str(image))
            _loaded(page, "#image img")

            # a click on a pixel: its curve appears, for exactly that pixel
            _click_pixel(page, 5, 11, factor)
            _wait_value(page, "#clicked textarea", "(5, 11)")
            _loaded(page, "#curve-plot img")
            assert ran[-1][0] == "curves" and ran[-1][1]["pixel"] == [(5, 11)]
            _click_pixel(page, 15, 0, factor)  # a corner pixel, appended
            _wait_value(page, "#clicked textarea", "(5, 11); (15, 0)")
            _shot(page.locator("#curve-plot"), shots / "curves.png")

            # a painted stroke becomes the region mask (and its curve)
            side = 16 * factor
            _paint(page, "region", side, [(side * 0.3, side * 0.3), (side * 0.45, side * 0.5),
                                          (side * 0.6, side * 0.7)])
            page.locator("#region-curve").click()
            _wait_value(page, "textarea", "region: fluctuation")
            mask = np.asarray(Image.open(ran[-1][1]["mask"])) > 0
            assert mask.shape == (16, 16) and 4 <= mask.sum() <= 120
            rows, cols = np.nonzero(mask)
            assert 3 <= rows.mean() <= 9 and 4 <= cols.mean() <= 11  # along the stroke
            _shot(page.locator("#region"), shots / "region.png")

            # a short removal on that region: the live loss plot and the result
            page.get_by_role("tab", name="Edit (curve matching)").click()
            number = page.locator("#iterations input[type=number]")
            number.fill("4")
            number.blur()
            page.locator("#edit-run").click()
            _loaded(page, "#edit-result img")
            _wait_value(page, "#edit-text textarea", "final loss")
            assert ran[-1][0] == "remove" and ran[-1][1]["iterations"] == 4
            page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for()
            _shot(page.locator("#edit-result"), shots / "edit.png")

            # directions of the region, then a strength slider moves the edit
            page.get_by_role("tab", name="Region directions (RBE)").click()
            page.locator("#discover").click()
            page.locator("#strength-0 input[type=range]").wait_for()
            _wait_value(page, "textarea", "singular values")
            track = page.locator("#strength-0 input[type=range]")
            tb = track.bounding_box()
            track.click(position={"x": tb["width"] * 0.8, "y": tb["height"] / 2})
            _loaded(page, "#rbe-result img")
            assert ran[-1][0] == "apply" and ran[-1][1]["strength"][0] > 10
            _wait_value(page, "textarea", "change inside")
            _shot(page.locator("#rbe-result"), shots / "rbe.png")
            browser.close()
    finally:
        app.close()
        session.close()
