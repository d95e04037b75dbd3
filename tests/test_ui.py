"""The web app: its actions are the registry's verbs (same files as the CLI for the same
settings), its inputs are checked, and the page answers through gradio_client."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import _assert_user_error, save_box_mask, save_rgb
from PIL import Image
from typer.testing import CliRunner

from diffgeo.cli import app as cli_app
from diffgeo.errors import InputError

pytest.importorskip("gradio")

from diffgeo.ui.session import MAX_UPLOAD_PIXELS, Session  # noqa: E402


@pytest.fixture
def session(tiny):
    s = Session(str(tiny), steps=10)
    yield s
    s.close()
    assert not s.root.exists()  # closing removes every file the app wrote


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    return save_rgb(tmp_path / "photo.png", 16, 16), save_box_mask(tmp_path / "m.png", 16, 16,
                                                                   (4, 4, 10, 10))


def _cli_rerun(command: str, out: Path) -> Path:
    """Run the command the app shows, as a user would paste it, into ``out``."""
    words = shlex.split(command)
    assert words[0] == "diffgeo"
    result = CliRunner().invoke(cli_app, [*words[1:], "--out", str(out)],
                                env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("verb, options, compared", [
    ("curves", {"pixel": [(3, 5), (10, 2)], "definition": "all"}, ["curves.csv", "curves.npz"]),
    ("saliency-map", {}, ["rate_maps.npz"]),
    ("remove", {"iterations": 2, "mask": "MASK"}, ["result.png", "history.csv"]),
    ("directions", {"k": 2, "mask": "MASK"}, ["directions/directions.safetensors"]),
    ("exemplar", {"exemplar": ("IMAGE",), "map": ("MASK",), "strength": 0.6},
     ["result.png", "composite.png"]),
])
def test_each_action_writes_what_the_cli_writes(session, files, tmp_path, verb, options,
                                                compared):
    image, mask = files
    subst = {"MASK": mask, "IMAGE": image}
    options = {k: (tuple(subst.get(x, x) for x in v) if isinstance(v, tuple)
                   else subst.get(v, v) if isinstance(v, str) else v)
               for k, v in options.items()}
    first = "source" if verb == "exemplar" else "image"
    run = session.run(verb, **{first: image, **options})
    assert run.folder.parent == session.root and run.archive.is_file()
    assert f"diffgeo {verb} " in run.command and "--out" not in run.command
    again = _cli_rerun(run.command, tmp_path / "cli")
    for name in compared:
        assert (run.folder / name).read_bytes() == (again / name).read_bytes(), name
    import json

    ours = json.loads((run.folder / "settings.json").read_text())["options"]
    theirs = json.loads((again / "settings.json").read_text())["options"]
    assert ours == theirs


def test_apply_after_discovery_equals_the_cli(session, files, tmp_path):
    image, mask = files
    found = session.run("directions", image=image, mask=mask, k=1)
    run = session.run("apply", image=image, directions=found.folder, strength=(12.0,))
    again = _cli_rerun(run.command, tmp_path / "cli")
    assert (run.folder / "edit-0.png").read_bytes() == (again / "edit-0.png").read_bytes()


def test_painted_strokes_become_the_mask_and_bad_uploads_are_refused(session):
    layer = np.zeros((32, 32, 4), np.uint8)  # painted at twice the image size
    layer[8:20, 4:12, 3] = 255
    path = session.save_mask({"background": None, "layers": [layer]}, (16, 16))
    mask = np.asarray(Image.open(path)) > 0
    expected = np.zeros((16, 16), bool)
    expected[4:10, 2:6] = True
    assert (mask == expected).all()
    with pytest.raises(InputError, match="paint the region"):
        session.save_mask({"layers": [np.zeros((16, 16, 4), np.uint8)]}, (16, 16))
    with pytest.raises(InputError, match="no image"):
        session.save_image(None)
    side = int(MAX_UPLOAD_PIXELS**0.5) + 1
    with pytest.raises(InputError, match="downscale"):
        session.save_image(np.zeros((side, side, 3), np.uint8))


def test_ui_verb_is_in_the_cli_and_refuses_a_bad_port(cli):
    result = cli.invoke(cli_app, ["ui", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--host" in result.output and "--port" in result.output
    _assert_user_error(cli.invoke(cli_app, ["ui", "--port", "70000"]), "--port")


def test_the_page_answers_through_gradio_client(session, files):
    from gradio_client import Client, handle_file

    from diffgeo.ui.app import launch

    image, mask = files
    app, _, url = launch(block=False, session=session)
    try:
        assert url.startswith("http://127.0.0.1:")
        client = Client(url, verbose=False)
        client.predict(handle_file(str(image)), api_name="/image")
        painted = {"background": handle_file(str(image)), "layers": [handle_file(str(mask))],
                   "composite": handle_file(str(image))}
        plot, text, command, archive = client.predict(painted, "h", "crop",
                                                      api_name="/region_curve")
        assert Path(plot).is_file() and "region: fluctuation" in text
        assert command.startswith("diffgeo curves ") and "--mask" in command
        assert Path(archive).suffix == ".zip"
        # a user error is the CLI's message, raised to the client (no traceback text)
        with pytest.raises(Exception, match="paint the region"):
            client.predict({"background": handle_file(str(image)), "layers": [],
                            "composite": handle_file(str(image))}, "h", "crop",
                           api_name="/region_curve")
    finally:
        app.close()


def test_clicks_on_the_enlarged_copy_are_image_pixels(session, files):
    from diffgeo.ui.session import DISPLAY_SIDE, display_factor

    image, _ = files
    picture = session.adopt_file(image)
    assert picture.path.read_bytes() == image.read_bytes()  # the upload, byte for byte
    f = picture.factor
    assert f == display_factor((16, 16)) == DISPLAY_SIDE // 16
    shown = session.shown(picture)
    original = np.asarray(Image.open(image).convert("RGB"))
    assert shown.shape == (16 * f, 16 * f, 3)
    assert (shown[::f, ::f] == original).all() and (shown[f - 1::f, f - 1::f] == original).all()
    # every screen pixel of an enlarged block is that block's image pixel
    assert picture.pixel(11 * f, 5 * f) == (5, 11) == picture.pixel(12 * f - 1, 6 * f - 1)
    assert picture.pixel(0, 16 * f - 1) == (15, 0)
    with pytest.raises(InputError, match="outside the 16x16 image"):
        picture.pixel(16 * f, 0)
    assert display_factor((512, 384)) == 1  # large images are shown as they are
    bad = image.with_name("bad.png")
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        session.adopt_file(bad)


def test_soft_maps_keep_opacity_and_feather_blurs(session):
    layer = np.zeros((32, 32, 4), np.uint8)  # the shown copy at twice the image size
    layer[8:24, 8:24, 3] = 128
    soft = np.asarray(Image.open(session.save_mask({"layers": [layer]}, (16, 16), soft=True)))
    assert soft[4:12, 4:12].min() == soft[4:12, 4:12].max() == 128 and soft[0, 0] == 0
    hard = np.asarray(Image.open(session.save_mask({"layers": [layer]}, (16, 16))))
    assert set(np.unique(hard)) == {0, 255}
    blurred = np.asarray(Image.open(session.save_mask({"layers": [layer]}, (16, 16), soft=True,
                                                      feather=2.0))).astype(int)
    assert 0 < blurred[3, 8] < 128 and blurred[8, 8] <= 128  # the edge fades both ways
    assert abs(blurred.sum() - soft.astype(int).sum()) < 0.05 * soft.sum()  # blur keeps mass


def test_stream_reports_each_iteration_and_cancel_leaves_nothing(session, files):
    from diffgeo.errors import Cancelled
    from diffgeo.ui.session import Iteration, Run

    image, mask = files
    events = list(session.stream("remove", image=image, mask=mask, iterations=3,
                                 snapshot_every=2))
    assert [type(e) for e in events] == [Iteration] * 3 + [Run]
    done = events[-1]
    assert [e.loss for e in events[:3]] == [h["loss"] for h in done.result.method.history]
    assert [e.snapshot is not None for e in events[:3]] == [False, True, False]
    before = set(session.root.iterdir())
    with pytest.raises(Cancelled, match="nothing was written"):
        for _ in session.stream("remove", image=image, mask=mask, iterations=50):
            session.cancel()  # the cancel button, pressed during the first iteration
    assert set(session.root.iterdir()) == before  # no folder, no zip of the stopped run
    with pytest.raises(InputError, match="iterations must be"):  # options are checked first
        next(session.stream("remove", image=image, mask=mask, iterations=0))


def test_saliency_becomes_a_region_and_an_edit_map_on_the_input(session, tmp_path):
    from diffgeo.io.images import Fit
    from diffgeo.maps import upsample_to_image
    from diffgeo.ui.app import painted_layer, saliency_on_input

    wide = save_rgb(tmp_path / "wide.png", 16, 24)  # cropped to 16x16 by --fit crop
    run = session.run("saliency-map", image=wide, fit="crop")
    sal = saliency_on_input(run)
    assert sal.shape == (16, 24) and sal.max() == 1.0
    fit = Fit.from_dict(run.result.settings["fit"])
    model = upsample_to_image(run.result.saliency, (16, 16)).numpy()
    assert sal[5, 4 + 7] == pytest.approx(model[5, 7] / model.max())  # crop offset: 4 columns
    assert (sal[:, :4] == 0).all() and (sal[:, 20:] == 0).all()  # cut away: not in the map
    assert fit.map_pixel((5, 11)) == (5, 7)
    layer = painted_layer(sal, 2)
    back = np.asarray(Image.open(session.save_mask({"layers": [layer]}, (16, 24), soft=True)))
    assert np.abs(back / 255 - sal).max() <= 1 / 255 + 1e-6  # what was sent is what comes back


def test_every_panel_answers_through_gradio_client_as_the_cli_would(session, files, tmp_path):
    from gradio_client import Client, handle_file

    from diffgeo.ui.app import EXEMPLAR_SLOTS, launch

    image, mask = files
    app, _, url = launch(block=False, session=session)
    try:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(image)), api_name="/image")
        # a typed pixel: the curves the CLI computes for it
        clicked, plot, text, command, archive = client.predict("5,11", "h", "crop",
                                                               api_name="/curve")
        assert clicked == "(5, 11)" and "--pixel 5,11" in command and Path(plot).is_file()
        cli = _cli_rerun(command, tmp_path / "curves")
        with zipfile.ZipFile(archive) as z:  # the downloadable folder is the CLI's folder
            assert z.read("curves.csv") == (cli / "curves.csv").read_bytes()
            assert sorted(z.namelist()) == sorted(
                str(f.relative_to(cli)) for f in cli.rglob("*") if f.is_file())
        with pytest.raises(Exception, match="outside the image"):
            client.predict("40,2", "h", "crop", api_name="/curve")
        # the saliency map, then the most salient quarter as the region
        client.predict("crop", api_name="/saliency")
        region = client.predict(25, api_name="/saliency_region")
        assert region["layers"]
        layer = tmp_path / "layer.png"  # what the brush paints: colour, opacity = the mask
        alpha = np.asarray(Image.open(mask).convert("L"))
        Image.fromarray(np.dstack([np.full((*alpha.shape, 3), 255, np.uint8), alpha])).save(layer)
        painted = {"background": handle_file(str(image)), "layers": [handle_file(str(layer))],
                   "composite": handle_file(str(image))}
        # curve matching, streamed: the last message holds the result
        loss, strip, result, curves, text, command, _ = client.predict(
            painted, "remove the object", 3, "fast", "exact", "crop", api_name="/edit")
        assert "final loss" in text and len(loss["data"]) == 3 and Path(result).is_file()
        assert "--derivative exact" in command
        cli = _cli_rerun(command, tmp_path / "remove")
        assert Path(result).read_bytes() == (cli / "result.png").read_bytes()
        # two exemplars, each with its map; the painted map is where the exemplar goes
        ex2 = save_rgb(tmp_path / "ex2.png", 16, 16, seed=3)
        slots = {"image": [handle_file(str(image)), handle_file(str(ex2)), None],
                 "map": [painted, painted, None], "feather": [0, 1.5, 0],
                 "place": [False] * EXEMPLAR_SLOTS, "row": [0] * EXEMPLAR_SLOTS,
                 "col": [0] * EXEMPLAR_SLOTS, "scale": [1.0] * EXEMPLAR_SLOTS}
        flat = [v for field in slots.values() for v in field]
        result, composite, masks, command, _ = client.predict(
            0.6, "linear", "", "crop", *flat, api_name="/exemplar")
        assert command.count("--exemplar") == 2 and "--invert-maps" in command
        cli = _cli_rerun(command, tmp_path / "exemplar")
        assert Path(result).read_bytes() == (cli / "result.png").read_bytes()
        with pytest.raises(Exception, match="place every exemplar or none"):
            slots["place"][0] = True
            client.predict(0.6, "linear", "", "crop",
                           *[v for field in slots.values() for v in field],
                           api_name="/exemplar")
    finally:
        app.close()
