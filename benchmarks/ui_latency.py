"""How long a person waits in the web app: click-to-curve and slider-to-image.

    python benchmarks/ui_latency.py [--model default] [--steps 20] [--reps 5] [--browser]
        [--json FILE] [--md FILE]

Starts ``diffgeo ui`` in-process on a free loopback port, puts a bundled scene in (the model's
size; a seeded random image when the model has none) and times, ``--reps`` times each:

- ``click-to-curve``: the curve of one pixel (``/curve``: inversion along the grid and the
  generation curve, the result folder and its zip), a new pixel each time, through
  ``gradio_client`` — the server round trip, what a click costs without the page;
- ``slider-to-image``: one strength of a direction found once beforehand (``/apply_0``), a new
  strength each time;
- with ``--browser`` (Debian's Chromium through Playwright): the same two from the page, from the
  mouse event to the new image loaded in the browser.

Medians and extremes in seconds, with the machine, the date and the settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _input_image(session, folder: Path) -> Path:
    from diffgeo.ui.app import _scenes

    scenes = _scenes(session)
    if scenes:
        arr = next(iter(scenes.values()))
    else:
        h, w = session.backbone.image_size
        arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = folder / "input.png"
    Image.fromarray(arr).save(path)
    return path


def _mask(size: tuple[int, int], folder: Path) -> Path:
    """A centred square region as an editor layer (opacity = region)."""
    h, w = size
    layer = np.zeros((h, w, 4), np.uint8)
    layer[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
    path = folder / "region.png"
    Image.fromarray(layer).save(path)
    return path


def _summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "n": len(times)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def server_side(url: str, image: Path, region: Path, size: tuple[int, int], reps: int
                ) -> dict[str, dict[str, float]]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    client.predict(handle_file(str(image)), api_name="/image")
    h, w = size
    pixels = [(int(r), int(c)) for r, c in
              np.random.default_rng(1).integers(0, [h, w], size=(reps + 1, 2))]
    client.predict(f"{pixels[0][0]},{pixels[0][1]}", "h", "crop", api_name="/curve")  # warm-up
    click = [_timed(lambda p=p: client.predict(f"{p[0]},{p[1]}", "h", "crop",
                                               api_name="/curve")) for p in pixels[1:]]
    painted = {"background": handle_file(str(image)), "layers": [handle_file(str(region))],
               "composite": handle_file(str(image))}
    t_discover = _timed(lambda: client.predict(painted, 3, "crop", api_name="/directions"))
    strengths = np.linspace(-40, 40, reps + 1)
    client.predict(float(strengths[0]), "crop", api_name="/apply_0")  # warm-up
    slide = [_timed(lambda s=s: client.predict(float(s), "crop", api_name="/apply_0"))
             for s in strengths[1:]]
    return {"click-to-curve": _summary(click), "slider-to-image": _summary(slide),
            "discover (once)": _summary([t_discover])}


def in_browser(url: str, image: Path, size: tuple[int, int], reps: int
               ) -> dict[str, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    from diffgeo.ui import browser as ui
    from diffgeo.ui.session import display_factor

    h, w = size
    rng = np.random.default_rng(2)
    click, slide = [], []
    with sync_playwright() as p:
        page = ui.open_page(p, url)
        ui.upload(page, image)
        for i in range(reps + 1):  # the first of each is a warm-up
            r, c = (int(v) for v in rng.integers(0, [h, w]))
            before = ui.image_source(page, "#curve-plot img")
            t0 = time.perf_counter()
            ui.click_pixel(page, r, c, display_factor(size))
            ui.wait_loaded(page, "#curve-plot img", other_than=before)
            if i:
                click.append(time.perf_counter() - t0)
        side = display_factor(size) * np.array(size)  # the region editor is on the first tab
        ui.paint(page, "region", tuple(side), [(side[0] * 0.3, side[1] * 0.3),
                                               (side[0] * 0.6, side[1] * 0.6)])
        page.get_by_role("tab", name="Region directions (RBE)").click()
        page.locator("#discover").click()
        ui.wait_value(page, "textarea", "singular values")
        for i, fraction in enumerate(np.linspace(0.2, 0.8, reps + 1)):
            before = ui.image_source(page, "#rbe-result img")
            t0 = time.perf_counter()
            ui.slide_to(page, "strength-0", float(fraction))
            ui.wait_loaded(page, "#rbe-result img", other_than=before)
            if i:
                slide.append(time.perf_counter() - t0)
        page.context.browser.close()
    return {"click-to-curve (browser)": _summary(click),
            "slider-to-image (browser)": _summary(slide)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20, help="The app's DDIM steps (its default).")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--browser", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffgeo.ui.app import launch
    from diffgeo.ui.session import Session

    session = Session(args.model, args.device, steps=args.steps)
    app, _, url = launch(block=False, session=session)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            image = _input_image(session, Path(tmp))
            size = session.backbone.image_size
            rows = server_side(url, image, _mask(size, Path(tmp)), size, args.reps)
            if args.browser:
                rows.update(in_browser(url, image, size, args.reps))
    finally:
        app.close()
        session.close()
    record = {"date": datetime.date.today().isoformat(), "machine": platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "model": args.model,
              "image_size": list(size), "steps": args.steps, "reps": args.reps,
              "seconds": rows}
    lines = ["| action | median s | min s | max s | n |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} | {v['n']} |"
              for k, v in rows.items()]
    table = "\n".join(lines)
    print(f"{args.model} ({size[0]}x{size[1]}, {args.steps} steps, "
          f"{record['threads']} threads, {record['date']})\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(f"# Web app latency\n\n{args.model} "
                                 f"({size[0]}x{size[1]}), {args.steps} DDIM steps, "
                                 f"{record['threads']} CPU threads, {record['date']}, "
                                 f"`python benchmarks/ui_latency.py"
                                 f"{' --browser' if args.browser else ''}`\n\n{table}\n")


if __name__ == "__main__":
    main()
