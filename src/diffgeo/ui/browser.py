"""Driving the web app from headless Chromium (Playwright), the way a person uses it: shared by
the browser tests, ``benchmarks/ui_latency.py --browser`` and ``scripts/ui_screenshots.py``.

The rules are Gradio 6's, measured: a click on an image is mapped to the shown image's pixels with
the scale r = min(box / natural, 1), the image centred in its box (so the app sends small images
enlarged, :func:`~diffgeo.ui.session.display_factor`); an image editor draws its background
centred in its canvas at the zoom its toolbar shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from diffgeo.errors import InputError

TIMEOUT_MS = 120_000


def chromium() -> str | None:
    """Debian's Chromium, which Playwright drives here (``playwright install`` cannot
    download browsers offline)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def open_page(playwright: Any, url: str, width: int = 1400, height: int = 1100) -> Any:
    path = chromium()
    if path is None:
        raise InputError("no Chromium found: apt install chromium")
    browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def upload(page: Any, image: str | Path) -> None:
    """Put an image file in through the upload button and wait until it is shown."""
    page.locator("#upload").locator("xpath=..").locator("input[type=file]").set_input_files(
        str(image))
    wait_loaded(page, "#image img")


def wait_loaded(page: Any, selector: str, other_than: str | None = None) -> None:
    """Wait until the image at ``selector`` is decoded (and, if given, no longer ``other_than``
    — the source it had before an action)."""
    page.wait_for_function(
        "([s, b]) => { const i = document.querySelector(s); return i && i.complete && "
        "i.naturalWidth > 0 && (b === null || i.src !== b) }", arg=[selector, other_than])


def image_source(page: Any, selector: str) -> str:
    return page.evaluate("s => document.querySelector(s)?.src || ''", selector)


def wait_value(page: Any, selector: str, text: str) -> None:
    """Wait until one of the fields at ``selector`` holds ``text``."""
    page.wait_for_function("([s, t]) => [...document.querySelectorAll(s)]"
                           ".some(e => e.value.includes(t))", arg=[selector, text])


def click_pixel(page: Any, row: int, col: int, factor: int) -> None:
    """Click image pixel (row, col) on the shown copy, enlarged ``factor`` times."""
    img = page.locator("#image img")
    nat_w, nat_h = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    box = img.bounding_box()
    r = min(box["width"] / nat_w, box["height"] / nat_h, 1)
    ox, oy = (box["width"] - nat_w * r) / 2, (box["height"] - nat_h * r) / 2
    img.click(position={"x": ox + (col + 0.5) * factor * r, "y": oy + (row + 0.5) * factor * r})


def paint(page: Any, elem_id: str, size: tuple[int, int],
          points: list[tuple[float, float]]) -> None:
    """A brush stroke through ``points`` (row, col) of the editor's background (``size`` =
    (H, W) shown pixels)."""
    zoom = float(page.locator(f"#{elem_id} .zoom-number span").inner_text().strip()
                 .rstrip("%")) / 100
    box = page.locator(f"#{elem_id} .pixi-target canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    h, w = size

    def screen(row: float, col: float) -> tuple[float, float]:
        return cx + (col + 0.5 - w / 2) * zoom, cy + (row + 0.5 - h / 2) * zoom

    page.mouse.move(*screen(*points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*screen(*p))
    page.mouse.up()


def set_number(page: Any, elem_id: str, value: float) -> None:
    """Type a value into a slider's number box (fires its change and release)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(5):  # a freshly shown tab may take the first keystrokes before it is live
        box.fill(str(value))
        box.blur()
        try:
            page.wait_for_function(
                "([s, v]) => Number(document.querySelector(s)?.value) === v",
                arg=[f"#{elem_id} input[type=range]", float(value)], timeout=2_000)
            return
        except Exception:  # Playwright's TimeoutError: type it again
            continue
    raise TimeoutError(f"the slider #{elem_id} did not take the value {value}")


def slide_to(page: Any, elem_id: str, fraction: float) -> None:
    """Click a slider's track at ``fraction`` of its width (change and release)."""
    track = page.locator(f"#{elem_id} input[type=range]")
    tb = track.bounding_box()
    track.click(position={"x": tb["width"] * fraction, "y": tb["height"] / 2})
