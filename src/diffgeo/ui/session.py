"""What the web app does with a person's inputs, without Gradio: one loaded model, one private
temporary folder, and every action a verb of the registry run into a result folder there.

The app (:mod:`diffgeo.ui.app`) only turns widgets into these calls, so each result is the same
folder the CLI writes (settings.json included) and comes with the equivalent ``diffgeo`` command.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffgeo.errors import InputError

#: Uploads larger than this many pixels are refused (a 32x32 model gains nothing from them).
MAX_UPLOAD_PIXELS = 4096 * 4096


@dataclass
class Run:
    """One action: the verb's result, its folder, the command that repeats it, a zip of it."""

    result: Any
    folder: Path
    command: str
    archive: Path

    def file(self, name: str) -> str:
        return str(self.folder / name)


class Session:
    """A model and a temporary folder; :meth:`close` removes the folder and all it holds."""

    def __init__(self, model: str = "default", device: str = "cpu", backbone: Any = None,
                 steps: int = 20) -> None:
        from diffgeo.backbones import load_backbone

        self.model = model
        self.device = device
        self.backbone = backbone if backbone is not None else load_backbone(model, device=device)
        self.steps = steps
        self.root = Path(tempfile.mkdtemp(prefix="diffgeo-ui-"))
        self._count = itertools.count(1)

    # ------------------------------------------------------------------ inputs
    def _name(self, stem: str) -> Path:
        return self.root / f"{next(self._count):04d}-{stem}"

    def save_image(self, image: np.ndarray | None, stem: str = "image") -> Path:
        """An uploaded RGB(A) array as a PNG in the session folder (the path a verb reads)."""
        if image is None:
            raise InputError("no image: upload one or pick a bundled scene")
        arr = np.asarray(image)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise InputError(f"an image must be H x W or H x W x C, got shape {arr.shape}")
        if arr.shape[0] * arr.shape[1] > MAX_UPLOAD_PIXELS:
            raise InputError(f"the image has {arr.shape[0]}x{arr.shape[1]} pixels; the app takes "
                             f"up to {MAX_UPLOAD_PIXELS // 1_000_000} MP: downscale it first")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        path = self._name(stem).with_suffix(".png")
        Image.fromarray(arr).save(path)
        return path

    def save_mask(self, painted: Any, size: tuple[int, int], stem: str = "mask") -> Path:
        """The strokes painted in an image editor as a white-on-black mask of ``size`` (H, W):
        a pixel belongs to the region where any layer is opaque (alpha > 0)."""
        layers = painted.get("layers") if isinstance(painted, dict) else None
        mask = np.zeros(size, bool)
        for layer in layers or []:
            arr = np.asarray(layer)
            if arr.ndim == 3 and arr.shape[2] == 4:
                alpha = arr[..., 3] > 0
            elif arr.ndim == 3:
                alpha = arr.max(axis=2) > 0
            else:
                alpha = arr > 0
            if alpha.shape != size:  # the editor works at the shown size
                alpha = np.asarray(Image.fromarray(alpha.astype(np.uint8) * 255).resize(
                    (size[1], size[0]), Image.NEAREST)) > 0
            mask |= alpha
        if not mask.any():
            raise InputError("paint the region first (the brush in the region editor)")
        path = self._name(stem).with_suffix(".png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        return path

    # ------------------------------------------------------------------ actions
    def run(self, verb_name: str, **options: Any) -> Run:
        """Run a registry verb on the session's model into a fresh folder of the session."""
        from diffgeo import verbs
        from diffgeo.cli import command_line

        verb = verbs.get(verb_name)
        values = {"model": self.model, "device": self.device, **options}
        if "steps" in verb.options.names() and "steps" not in options:
            values["steps"] = self.steps
        folder = self._name(verb_name)
        opts = verb.options.build({**values, "out": folder})
        result = verb.run(opts, backbone=self.backbone, progress=True)
        archive = folder.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(folder))
        return Run(result, folder, command_line(verb, opts), archive)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
