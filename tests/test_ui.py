"""The web app: its actions are the registry's verbs (same files as the CLI for the same
settings), its inputs are checked, and the page answers through gradio_client."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shlex
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
