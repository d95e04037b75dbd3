"""Bad input, verb by verb: bad files, bad numbers, bad locations.

Every case must end in one clear ``error:`` line naming what is wrong, exit status 2, no
traceback, and leave every file the user had exactly as it was (no new files, no empty output
folders). The cases run through the CLI in-process on an untrained tiny model.
"""

from __future__ import annotations

import errno
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _assert_user_error, save_box_mask, save_rgb
from PIL import Image
from typer.testing import CliRunner

from diffgeo.cli import app

ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


@dataclass
class Sandbox:
    """The user's folder: an image of the model's size, a mask, an exemplar, broken files."""

    root: Path
    model: Path

    @property
    def image(self) -> Path:
        return self.root / "photo.png"

    @property
    def mask(self) -> Path:
        return self.root / "mask.png"

    def exemplar(self, *extra: str) -> list[str]:
        return [*self.base("exemplar"), "--exemplar", str(self.image), "--map", str(self.mask),
                *extra]

    def file(self, name: str, data: bytes) -> Path:
        p = self.root / name
        p.write_bytes(data)
        return p

    def base(self, verb: str, image: Path | None = None) -> list[str]:
        return [verb, str(image or self.image), "--model", str(self.model), "--steps", "10"]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``root``; links by their target."""
    snap: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = ("-> " + os.readlink(p)).encode()
        elif p.is_dir():
            snap[rel] = None
        else:
            snap[rel] = p.read_bytes()
    return snap


@pytest.fixture
def box(tmp_path, tiny, monkeypatch) -> Sandbox:
    sb = Sandbox(tmp_path / "user", tiny)
    sb.root.mkdir()
    monkeypatch.chdir(sb.root)  # a default --out would land in the snapshot
    save_rgb(sb.image, 16, 16)
    save_box_mask(sb.mask, 16, 16, (4, 4, 10, 10))
    return sb


def _png_bytes(h: int, w: int) -> bytes:
    import io

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")  # noise: the pixel data is most of the file
    return buf.getvalue()


def _huge_png(sb: Sandbox) -> Path:
    # A 1-bit 20000 x 20000 image: 50 kB on disk, 1.2 GB as the float tensor a model would get.
    p = sb.root / "huge.png"
    Image.new("1", (20000, 20000)).save(p)
    return p


Case = Callable[[Sandbox], list[str]]

# (id, arguments built in the sandbox, fragments the error line must contain)
CASES: list[tuple[str, Case, tuple[str, ...]]] = [
    # ---------------------------------------------------------------- bad files
    ("missing image", lambda s: s.base("invert", s.root / "nope.png"), ("nope.png",)),
    ("empty image", lambda s: s.base("invert", s.file("empty.png", b"")), ("empty.png",)),
    ("truncated image", lambda s: s.base("invert", s.file("cut.png", _png_bytes(16, 16)[:400])),
     ("cut.png",)),
    ("text as image", lambda s: s.base("invert", s.file("notes.png", b"hello\n" * 20)),
     ("notes.png",)),
    ("folder as image", lambda s: s.base("invert", s.root), (str(Path("user")),)),
    ("huge image", lambda s: s.base("invert", _huge_png(s)) + ["--fit", "resize"],
     ("huge.png", "pixels")),
    ("image over the memory budget", lambda s: s.base("invert") + [
        "--fit", "resize", "--max-memory", "0.000001"], ("photo.png", "--max-memory")),
    ("missing mask", lambda s: s.base("remove") + ["--mask", str(s.root / "m.png")],
     ("m.png",)),
    ("truncated mask", lambda s: s.base("remove") + [
        "--mask", str(s.file("m.png", _png_bytes(16, 16)[:400]))], ("m.png",)),
    ("missing exemplar", lambda s: s.base("exemplar") + ["--exemplar", str(s.root / "e.png"),
                                                         "--map", str(s.mask)], ("e.png",)),
    ("missing map", lambda s: s.base("exemplar") + ["--exemplar", str(s.image), "--map",
                                                    str(s.root / "map.png")], ("map.png",)),
    ("model is a file", lambda s: ["invert", str(s.image), "--model", str(s.image)],
     ("photo.png",)),
    ("model folder missing", lambda s: ["invert", str(s.image), "--model",
                                        str(s.root / "no-model")], ("no-model",)),
    ("directions not a directions folder", lambda s: s.base("apply") + [
        "--directions", str(s.root)], ("directions",)),
    ("missing jobs file", lambda s: ["batch", str(s.root / "jobs.jsonl"), "--out",
                                     str(s.root / "b")], ("jobs.jsonl",)),
    # ---------------------------------------------------------------- bad numbers
    ("steps 0", lambda s: s.base("invert") + ["--steps", "0"], ("--steps",)),
    ("steps negative", lambda s: s.base("invert") + ["--steps", "-3"], ("--steps",)),
    ("t negative", lambda s: s.base("invert") + ["--t", "-5"], ("--t",)),
    ("t beyond T", lambda s: s.base("invert") + ["--t", "100000"], ("100000",)),
    ("tol nan", lambda s: s.base("invert") + ["--exact", "--tol", "nan"], ("--tol",)),
    ("tol negative", lambda s: s.base("invert") + ["--exact", "--tol", "-1"], ("--tol",)),
    ("max-iter 0", lambda s: s.base("invert") + ["--max-iter", "0"], ("--max-iter",)),
    ("pixel outside", lambda s: s.base("curves") + ["--pixel", "99,99"], ("99",)),
    ("pixel not numbers", lambda s: s.base("curves") + ["--pixel", "a,b"], ("--pixel",)),
    ("k 0", lambda s: s.base("curves") + ["--pixel", "3,3", "--k", "0"], ("--k",)),
    ("window 0", lambda s: s.base("curves") + ["--pixel", "3,3", "--window", "0"],
     ("--window",)),
    ("window beyond the path", lambda s: s.base("saliency-map") + ["--window", "100"],
     ("--window", "--steps")),
    ("t-min above the path", lambda s: s.base("curves") + ["--pixel", "3,3", "--t-min", "5000"],
     ("--t-min",)),
    ("t off the grid", lambda s: s.base("curves") + ["--pixel", "3,3", "--t", "555"],
     ("--t=555", "nearest")),
    ("iterations 0", lambda s: s.base("remove") + ["--mask", str(s.mask), "--iterations", "0"],
     ("--iterations",)),
    ("lr nan", lambda s: s.base("remove") + ["--mask", str(s.mask), "--lr", "nan"], ("--lr",)),
    ("lr inf", lambda s: s.base("remove") + ["--mask", str(s.mask), "--lr", "inf"], ("--lr",)),
    ("lambda1 negative", lambda s: s.base("remove") + ["--mask", str(s.mask), "--lambda1", "-1"],
     ("--lambda1",)),
    ("probes 0", lambda s: s.base("saliency-map") + ["--probes", "0"], ("--probes",)),
    ("probes huge", lambda s: s.base("saliency-map") + ["--probes", "100000000"],
     ("--probes", "GiB")),
    ("max-memory too small", lambda s: s.base("saliency-map") + ["--max-memory", "0.00001"],
     ("--probes", "--max-memory")),
    ("max-memory nan", lambda s: s.base("invert") + ["--max-memory", "nan"], ("--max-memory",)),
    ("directions k 0", lambda s: s.base("directions") + ["--mask", str(s.mask), "--k", "0"],
     ("--k",)),
    ("directions k beyond h", lambda s: s.base("directions") + ["--mask", str(s.mask), "--k",
                                                                "100000"], ("--k",)),
    ("strength nan", lambda s: s.exemplar("--strength", "nan"), ("--strength",)),
    ("strength above 1", lambda s: s.exemplar("--strength", "1.5"), ("--strength",)),
    ("exemplar scale huge", lambda s: s.exemplar("--place", "0,0,10000"), ("--place", "GiB")),
    ("resample 0", lambda s: s.base("inpaint") + ["--mask", str(s.mask), "--resample", "0"],
     ("--resample",)),
    ("device index missing", lambda s: s.base("invert") + ["--device", "cuda:7"],
     ("device", "cuda:7")),
    ("device unknown", lambda s: s.base("invert") + ["--device", "gpu0"], ("device", "gpu0")),
    ("fp16 with derivatives", lambda s: s.base("curves") + ["--pixel", "3,3", "--dtype",
                                                            "float16"], ("--dtype",)),
    ("region twice", lambda s: s.base("remove") + ["--mask", str(s.mask), "--box", "1,1,4,4"],
     ("--mask", "--box")),
    ("blend without mask", lambda s: s.base("blend"), ("blend needs --mask",)),
    # ---------------------------------------------------------------- bad locations
    ("out is a file", lambda s: s.base("invert") + ["--out", str(s.image)], ("photo.png",)),
    ("out under a file", lambda s: s.base("invert") + ["--out", str(s.image / "sub")],
     ("photo.png",)),
    ("out unwritable", lambda s: s.base("invert") + ["--out", "/proc/diffgeo-test-out"],
     ("/proc/diffgeo-test-out",)),
]


@pytest.mark.parametrize("args, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(box, args, fragments):
    argv = args(box)
    before = _snapshot(box.root)
    result = CliRunner().invoke(app, argv, env=ENV)
    _assert_user_error(result, *fragments)
    assert _snapshot(box.root) == before


# ------------------------------------------------------------------ what the user owns


def _invert(box: Sandbox, out: Path, *extra: str):
    return CliRunner().invoke(app, [*box.base("invert"), "--t", "500", "--out", str(out),
                                    *extra], env=ENV)


def test_existing_result_is_refused_before_any_work_and_kept(box):
    out = box.root / "out"
    out.mkdir()
    (out / "reconstruction.png").write_bytes(b"mine")
    before = _snapshot(box.root)
    _assert_user_error(_invert(box, out), "reconstruction.png", "--force")
    assert _snapshot(box.root) == before


@pytest.mark.parametrize("name", ["result.png", "settings.json"])
def test_force_never_replaces_an_input_lying_under_a_result_name(box, name):
    out = box.root / "out"
    out.mkdir()
    # the user's mask lies in --out under a name the verb writes (and a hard link to it)
    mask = out / name
    mask.write_bytes(box.mask.read_bytes())
    before = _snapshot(box.root)
    result = CliRunner().invoke(app, [*box.base("remove"), "--mask", str(mask), "--iterations",
                                      "1", "--out", str(out), "--force"], env=ENV)
    _assert_user_error(result, name, "input")
    assert _snapshot(box.root) == before


def test_force_never_writes_through_a_symlink(box, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text("the user's file\n")
    out = box.root / "out"
    out.mkdir()
    (out / "settings.json").symlink_to(outside)
    assert _invert(box, out, "--force").exit_code == 0
    assert outside.read_text() == "the user's file\n"
    assert not (out / "settings.json").is_symlink()  # the link was replaced, not followed


def test_a_symlinked_subfolder_is_not_written_through(box, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = box.root / "out"
    out.mkdir()
    (out / "directions").symlink_to(elsewhere, target_is_directory=True)
    result = CliRunner().invoke(app, [*box.base("directions"), "--mask", str(box.mask), "--k",
                                      "1", "--out", str(out), "--force"], env=ENV)
    _assert_user_error(result, "symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_a_full_disk_leaves_no_partial_result(box, monkeypatch):
    from diffgeo.io import results

    real = results.atomic_write
    calls = []

    def fill_up(target, writer, text=False):
        calls.append(target)
        if len(calls) >= 3:  # a few files fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real(target, writer, text)

    monkeypatch.setattr(results, "atomic_write", fill_up)
    out = box.root / "new" / "out"
    before = _snapshot(box.root)
    line = _assert_user_error(_invert(box, out), "No space left on device")
    assert "nothing of this run was kept" in line
    assert len(calls) == 3
    assert _snapshot(box.root) == before  # not even the folders it created


def test_an_interrupted_run_leaves_an_existing_out_as_it_was(box, monkeypatch):
    out = box.root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep\n")
    from diffgeo.verbs.invert import InvertResult

    real = InvertResult.write

    def write_then_interrupt(self, results):
        real(self, results)  # every file written...
        raise KeyboardInterrupt  # ...and Ctrl-C before the run returns

    monkeypatch.setattr(InvertResult, "write", write_then_interrupt)
    before = _snapshot(box.root)
    result = _invert(box, out)
    assert result.exit_code == 130 and "error: interrupted" in result.stderr
    assert _snapshot(box.root) == before


# ------------------------------------------------------------------ the Python API


@pytest.mark.parametrize("bad", ["x", "v", "u"])
def test_derivatives_refuse_non_finite_input(pixel_bb, bad):
    from diffgeo import jacobian
    from diffgeo.errors import InputError

    x = torch.zeros(1, *pixel_bb.state_shape, dtype=pixel_bb.dtype)
    v = torch.ones_like(x)
    values = {"x": x, "v": v, "u": v}
    values[bad] = values[bad].clone().index_put_((torch.tensor([0]),), torch.tensor(math.nan))
    with pytest.raises(InputError, match=f"{bad} contains NaN"):
        if bad == "u":
            jacobian.vjp(pixel_bb, values["x"], values["u"], 500)
        else:
            jacobian.jvp(pixel_bb, values["x"], values["v"], 500)
