"""What the web app does with a person's inputs, without Gradio: one loaded model, one private
temporary folder, and every action a verb of the registry run into a result folder there.

The app (:mod:`diffgeo.ui.app`) only turns widgets into these calls, so each result is the same
folder the CLI writes (settings.json included) and comes with the equivalent ``diffgeo`` command.
Coordinates are the CLI's: (row, col) in the pixels of the image as the user gave it.
"""

from __future__ import annotations

import itertools
import queue
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from diffgeo.errors import Cancelled, InputError

#: Uploads larger than this many pixels are refused (a 32x32 model gains nothing from them).
MAX_UPLOAD_PIXELS = 4096 * 4096
#: Images are shown at least this many screen pixels on their longer side: a model-sized image
#: (32x32) is enlarged by a whole factor with sharp pixels, so a click lands on exactly one.
DISPLAY_SIDE = 320
NO_IMAGE = "no image: upload one or pick a bundled scene"


@dataclass
class Run:
    """One action: the verb's result, its folder, the command that repeats it, a zip of it."""

    result: Any
    folder: Path
    command: str
    archive: Path

    def file(self, name: str) -> str:
        return str(self.folder / name)


@dataclass(frozen=True)
class Picture:
    """An input image of the session: its file (what the verbs read), its size (H, W) and the
    whole factor it is shown enlarged by (screen pixel // factor = image pixel)."""

    path: Path
    size: tuple[int, int]
    factor: int

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """A click on the shown copy, (x, y) in its pixels, as (row, col) of the image."""
        row, col = int(y) // self.factor, int(x) // self.factor
        h, w = self.size
        if not (0 <= row < h and 0 <= col < w):
            raise InputError(f"the click ({row}, {col}) is outside the {h}x{w} image")
        return row, col


@dataclass(frozen=True)
class Iteration:
    """A curve-matching iteration reported while a run goes on (for the live loss plot)."""

    iteration: int
    loss: float
    snapshot: Any  # the intermediate result image (1, C, H, W) in [-1, 1], or None


def display_factor(size: tuple[int, int]) -> int:
    return max(1, DISPLAY_SIDE // max(size))


def rgb_uint8(path: Path, name: str = "image") -> np.ndarray:
    """The image file as the verbs decode it (EXIF orientation applied), RGB uint8 to show."""
    from diffgeo.io.images import open_image, pil_to_unit

    colour, _ = pil_to_unit(open_image(path, name), name)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return (colour * 255).round().astype(np.uint8)


class Session:
    """A model and a temporary folder; :meth:`close` removes the folder and all it holds. Runs
    happen one at a time (a lock), and :meth:`cancel` stops the one going on."""

    def __init__(self, model: str = "default", device: str = "cpu", backbone: Any = None,
                 steps: int = 20, *, dtype: str | None = None, h_block: int | None = None,
                 guidance: float | None = None) -> None:
        from diffgeo.backbones import load_backbone

        self.model = model
        self.device = device
        # how the model was loaded: every run (and the command it shows) says the same
        self.load_options = {k: v for k, v in (("dtype", dtype), ("h_block", h_block),
                                                ("guidance", guidance)) if v is not None}
        self.backbone = backbone if backbone is not None else load_backbone(
            model, device=device, **self.load_options)
        self.steps = steps
        self.root = Path(tempfile.mkdtemp(prefix="diffgeo-ui-"))
        self._count = itertools.count(1)
        self._busy = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ inputs
    def _name(self, stem: str) -> Path:
        return self.root / f"{next(self._count):04d}-{stem}"

    def _picture(self, path: Path, name: str) -> Picture:
        h, w = rgb_uint8(path, name).shape[:2]  # decodes it: a broken file is refused here
        return Picture(path, (h, w), display_factor((h, w)))

    @staticmethod
    def _check_pixels(h: int, w: int) -> None:
        if h * w > MAX_UPLOAD_PIXELS:
            raise InputError(f"the image has {h}x{w} pixels; the app takes up to "
                             f"{MAX_UPLOAD_PIXELS // 1_000_000} MP: downscale it first")

    def save_image(self, image: np.ndarray | None, stem: str = "image") -> Picture:
        """An RGB(A) array (a bundled scene, a pasted image) as a PNG in the session folder."""
        if image is None:
            raise InputError(NO_IMAGE)
        arr = np.asarray(image)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise InputError(f"an image must be H x W or H x W x C, got shape {arr.shape}")
        self._check_pixels(*arr.shape[:2])
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        path = self._name(stem).with_suffix(".png")
        Image.fromarray(arr).save(path)
        return self._picture(path, stem)

    def adopt_file(self, upload: str | Path | None, stem: str = "image") -> Picture:
        """An uploaded file, copied byte for byte (a verb decodes it exactly as the CLI would
        decode the user's own file), after its size and decodability are checked."""
        from diffgeo.io.images import header_size

        if not upload:
            raise InputError(NO_IMAGE)
        source = Path(upload)
        hw = header_size(source)
        if hw is None:
            rgb_uint8(source, stem)  # raises the decoder's one-line reason
            raise InputError(f"not a readable image: {source.name}")
        self._check_pixels(*hw)
        path = self._name(stem).with_suffix(source.suffix.lower() or ".png")
        shutil.copyfile(source, path)
        return self._picture(path, stem)

    def shown(self, picture: Picture) -> np.ndarray:
        """The copy of ``picture`` the page shows and paints on: enlarged by its factor."""
        arr = rgb_uint8(picture.path)
        f = picture.factor
        return arr.repeat(f, axis=0).repeat(f, axis=1) if f > 1 else arr

    def save_mask(self, painted: Any, size: tuple[int, int], stem: str = "mask", *,
                  feather: float = 0.0, soft: bool = False) -> Path:
        """What was painted in an image editor (any layer, at any shown size) as a grey mask of
        ``size`` (H, W), white = painted. A region (``soft=False``) is where any layer is
        opaque; a soft map keeps the layers' opacity, and ``feather`` blurs it by that many
        image pixels (Gaussian σ) so an edit map fades instead of cutting."""
        layers = painted.get("layers") if isinstance(painted, dict) else None
        mask = np.zeros(size, np.float32)
        for layer in layers or []:
            arr = np.asarray(layer)
            if arr.ndim == 3 and arr.shape[2] == 4:
                alpha = arr[..., 3].astype(np.float32) / 255
            elif arr.ndim == 3:
                alpha = (arr.max(axis=2) > 0).astype(np.float32)
            else:
                alpha = (arr > 0).astype(np.float32)
            if not soft:
                alpha = (alpha > 0).astype(np.float32)
            if alpha.shape != size:  # the editor works at the shown size
                resample = Image.BOX if soft else Image.NEAREST  # BOX: the mean of a block
                alpha = np.asarray(Image.fromarray(alpha).resize(
                    (size[1], size[0]), resample))
            mask = np.maximum(mask, alpha)
        if not (mask > 0).any():
            raise InputError("paint the region first (the brush in the region editor)")
        img = Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8))
        if feather > 0:
            img = img.filter(ImageFilter.GaussianBlur(feather))
        path = self._name(stem).with_suffix(".png")
        img.save(path)
        return path

    # ------------------------------------------------------------------ actions
    def run(self, verb_name: str, **options: Any) -> Run:
        """Run a registry verb on the session's model into a fresh folder of the session."""
        from diffgeo import verbs
        from diffgeo.cli import command_line

        verb = verbs.get(verb_name)
        values = {"model": self.model, "device": self.device, **self.load_options, **options}
        if "steps" in verb.options.names() and "steps" not in options:
            values["steps"] = self.steps
        folder = self._name(verb_name)
        opts = verb.options.build({**values, "out": folder})  # checks every option first
        with self._busy:
            result = verb.run(opts, backbone=self.backbone, progress=True)
        archive = folder.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(folder))
        return Run(result, folder, command_line(verb, opts), archive)

    def stream(self, verb_name: str, **options: Any) -> Iterator[Iteration | Run]:
        """:meth:`run` in a worker thread: yields an :class:`Iteration` for every curve-matching
        iteration as it happens, then the :class:`Run`. After :meth:`cancel` the run stops at
        its next iteration, leaves nothing behind and this raises :class:`Cancelled`."""
        from diffgeo.editing.curve_matching import observe_iterations

        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = self._stop = threading.Event()

        def observe(it: int, entry: dict[str, Any], snapshot: Any) -> None:
            if stop.is_set():
                raise Cancelled("cancelled: the run was stopped and nothing was written")
            events.put(("iteration", Iteration(it, float(entry["loss"]), snapshot)))

        def work() -> None:
            try:
                with observe_iterations(observe):
                    events.put(("done", self.run(verb_name, **options)))
            except BaseException as e:  # handed to the caller's thread, raised there
                events.put(("error", e))

        threading.Thread(target=work, name=f"diffgeo-{verb_name}", daemon=True).start()
        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            yield value
            if kind == "done":
                return

    def cancel(self) -> None:
        """Stop the run :meth:`stream` is doing, at its next iteration."""
        self._stop.set()

    def close(self) -> None:
        self.cancel()
        shutil.rmtree(self.root, ignore_errors=True)
