"""Screenshots of each panel of the web app, made by using it in headless Chromium (the README's).

    python scripts/ui_screenshots.py [--model default] [--out docs/ui] [--iterations 30]

On a bundled held-out scene (a seeded random image on models without scenes): click two pixels
(one on the object, one on the background) and paint the object for its curve and the saliency
map (``curves.png``); remove it by curve matching (``edit.png``); discover its directions and
slide along the first (``rbe.png``); paste a second scene's object with a painted edit map
(``pixels.png``). Each screenshot is checked not to be blank; existing files are replaced only
with ``--force``.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAMES = ("curves.png", "edit.png", "rbe.png", "pixels.png")


def _inputs(size: tuple[int, int], folder: Path) -> tuple[Path, Path, np.ndarray]:
    """(source image, exemplar image, object mask of the source) as files / an array."""
    from diffgeo.data import bundled_scenes
    from diffgeo.errors import InputError

    try:
        scenes = bundled_scenes(size[0]) if size[0] == size[1] else []
    except InputError:
        scenes = []
    paths = [folder / "source.png", folder / "exemplar.png"]
    if len(scenes) >= 2:
        for path, scene in zip(paths, scenes[:2], strict=True):
            Image.fromarray((scene.composite * 255).round().astype(np.uint8)).save(path)
        return paths[0], paths[1], scenes[0].mask > 0.5
    rng = np.random.default_rng(0)
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    mask = np.zeros(size, bool)
    mask[size[0] // 4:3 * size[0] // 4, size[1] // 4:3 * size[1] // 4] = True
    return paths[0], paths[1], mask


def _stroke(mask: np.ndarray, factor: int) -> list[tuple[float, float]]:
    """A zig-zag over the mask's bounding box, in shown pixels."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    points = []
    for i, r in enumerate(np.linspace(r0 + 0.5, r1 - 0.5, 5)):
        for c in ((c0 + 0.5, c1 - 0.5) if i % 2 == 0 else (c1 - 0.5, c0 + 0.5)):
            points.append((float(r) * factor, float(c) * factor))
    return points


def _shot(page, path: Path) -> None:
    png = page.screenshot(path=str(path), full_page=True)
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    if grey.std() < 5:
        raise SystemExit(f"{path} looks blank")
    print(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--out", default="docs/ui")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    taken = [out / n for n in NAMES if (out / n).exists()]
    if taken and not args.force:
        raise SystemExit(f"{taken[0]} exists: pass --force to replace the screenshots")
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    from diffgeo.ui import browser as ui
    from diffgeo.ui.app import launch
    from diffgeo.ui.session import Session, display_factor

    session = Session(args.model, steps=args.steps)
    app, _, url = launch(block=False, session=session)
    size = session.backbone.image_size
    f = display_factor(size)
    shown = (size[0] * f, size[1] * f)
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
            source, exemplar, mask = _inputs(size, Path(tmp))
            page = ui.open_page(p, url, height=1000)
            ui.upload(page, source)
            rows, cols = np.nonzero(mask)
            inside = (int(rows.mean()), int(cols.mean()))
            outside = (1, 1) if not mask[1, 1] else (size[0] - 2, size[1] - 2)
            for pixel in (inside, outside):
                before = ui.image_source(page, "#curve-plot img")
                ui.click_pixel(page, *pixel, f)
                ui.wait_loaded(page, "#curve-plot img", other_than=before)
            ui.paint(page, "region", shown, _stroke(mask, f))
            page.locator("#saliency").click()
            ui.wait_loaded(page, "#saliency-map img")
            _shot(page, out / "curves.png")

            page.get_by_role("tab", name="Edit (curve matching)").click()
            ui.set_number(page, "iterations", args.iterations)
            page.locator("#edit-run").click()
            ui.wait_value(page, "#edit-text textarea", "final loss")
            ui.wait_loaded(page, "#edit-result img")
            _shot(page, out / "edit.png")

            page.get_by_role("tab", name="Region directions (RBE)").click()
            page.locator("#discover").click()
            ui.wait_value(page, "textarea", "singular values")
            ui.wait_loaded(page, "#previews img")
            ui.slide_to(page, "strength-0", 0.85)
            ui.wait_loaded(page, "#rbe-result img")
            _shot(page, out / "rbe.png")

            page.get_by_role("tab", name="Exemplar (PIXELS)").click()
            page.locator("#exemplar-1 input[type=file]").set_input_files(str(exemplar))
            ui.wait_loaded(page, "#exemplar-1 img")
            ui.paint(page, "edit-map-1", shown, _stroke(mask, f))
            page.locator("#pixels-run").click()
            ui.wait_loaded(page, "#pixels-result img")
            _shot(page, out / "pixels.png")
            page.context.browser.close()
    finally:
        app.close()
        session.close()


if __name__ == "__main__":
    main()
