"""The verb registry (diffgeo.verbs): one declaration drives the CLI, batch and settings.json."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import _assert_user_error
from PIL import Image

from diffgeo import verbs
from diffgeo.batch import read_jobs, run_batch
from diffgeo.cli import app
from diffgeo.errors import InputError
from diffgeo.verbs.options import RESERVED, meta_of

ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "HF_HUB_OFFLINE": "1"}


def _invoke(cli, args: list):
    return cli.invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    """A 16x16 image: the tiny model's size, no fit needed."""
    path = tmp_path_factory.mktemp("verbs") / "square.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------ one registry
def test_the_registry_drives_the_cli_with_the_same_names_and_groups():
    group = typer.main.get_command(app)
    commands = group.commands
    names = [v.name for v in verbs.all_verbs()]
    assert sorted(commands) == sorted(names)  # no CLI verb outside the registry, none missing
    panels = {cmd.name: cmd.rich_help_panel for cmd in commands.values()}
    for v in verbs.all_verbs():
        assert panels[v.name] == verbs.GROUPS[v.group]
        # every CLI parameter is an option field of the same name, and every field is offered
        params = {p.name for p in commands[v.name].params}
        fields = {f.name for f in dataclasses.fields(v.options) if meta_of(f).cli}
        assert params == fields, v.name
    assert {v.group for v in verbs.all_verbs()} == set(verbs.GROUPS)
    assert verbs.get("info").group == "model" and verbs.get("batch").group == "runs"


def test_help_groups_the_verbs_by_purpose(cli):
    result = _invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    out = result.output
    heads = [m.start() for g in verbs.GROUPS.values()
             for m in [re.search(rf"─ {g} ─", out)] if m]
    assert len(heads) == len(verbs.GROUPS) and heads == sorted(heads)  # each panel, in order
    for v in verbs.all_verbs():
        panel = verbs.GROUPS[v.group]
        start = out.index(f"─ {panel} ─")
        end = out.index("╰", start)
        assert re.search(rf"│ {re.escape(v.name)}\s", out[start:end]), (v.name, panel)


def test_batch_takes_every_folder_verb_by_its_cli_name_and_option_names(tmp_path, square):
    from diffgeo.batch import batch_verbs

    assert set(batch_verbs()) == {v.name for v in verbs.all_verbs() if v.batchable}
    assert "adjust-saliency" in batch_verbs() and "saliency" not in batch_verbs()
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"verb": "invert", "image": str(square), "steps": 10, "t": 500},
        {"verb": "curves", "image": str(square), "pixel": ["3,4", [5, 6]], "box": "1,1,4,4"},
        {"verb": "adjust-saliency", "image": str(square), "box": [1, 1, 4, 4],
         "increase": True, "pixels_per_iteration": 2, "t_blend": 300},
        {"verb": "apply", "image": str(square), "directions": "d", "strength": "-5,5"},
        {"task": "invert", "image": str(square)},  # the old key
        {"verb": "invert", "image": str(square), "num_steps": 10},  # an old option name
        {"verb": "saliency", "image": str(square)},  # an old batch name
        {"verb": "invert", "image": str(square), "seed": 1},  # invert draws nothing random
    ]
    jobs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = read_jobs(jobs)
    assert [j.error for j in got[:4]] == [None] * 4
    assert '"task" is now "verb"' in got[4].error
    assert "num_steps (now steps)" in got[5].error
    assert "unknown verb 'saliency'" in got[6].error and "adjust-saliency" in got[6].error
    assert "unknown option(s) seed" in got[7].error


def test_seed_is_offered_only_by_verbs_that_draw_random_numbers():
    seeded = {v.name for v in verbs.all_verbs() if "seed" in v.options.names()}
    assert {"invert", "curves"}.isdisjoint(seeded)
    assert {"saliency-map", "inpaint", "directions", "apply", "exemplar", "remove"} <= seeded


# ------------------------------------------------------------------------------ validation
def test_options_are_checked_on_construction_before_any_compute(square):
    Opts = verbs.get("exemplar").options
    with pytest.raises(InputError, match="one --map per --exemplar"):
        Opts(source=square, exemplar=(square,))
    with pytest.raises(InputError, match="--threshold must be one of linear"):
        Opts(source=square, exemplar=(square,), map=(square,), threshold="steep")
    with pytest.raises(InputError, match="--strength must be in"):
        Opts(source=square, exemplar=(square,), map=(square,), strength=1.5)
    opts = Opts(source=str(square), exemplar=[str(square)], map=[str(square)], fit="pad")
    assert opts.exemplar == (square,) and str(opts.fit) == "pad"  # text and lists converted
    with pytest.raises(InputError, match="--probes must be >= 1"):
        verbs.get("saliency-map").options(image=square, probes=0)


@pytest.mark.parametrize("verb, extra", [
    ("curves", ["--pixel", "3,4"]),
    ("saliency-map", []),
    ("remove", ["--box", "1,1,5,5"]),
    ("transfer", ["--box", "1,1,5,5", "--reference", "8,8"]),
    ("directions", ["--box", "1,1,5,5"]),
    ("blend", ["--mask", "MASK"]),
])
def test_half_precision_is_refused_for_verbs_that_differentiate(cli, tiny, square, tmp_path,
                                                               verb, extra):
    extra = [str(square) if e == "MASK" else e for e in extra]
    out = tmp_path / "o"
    r = _invoke(cli, [verb, square, "--model", tiny, "--dtype", "float16", "--out", out, *extra])
    _assert_user_error(r, "--dtype float16", "float32")
    assert not out.exists()  # refused before anything was loaded or written


def test_half_precision_apply_is_refused_only_with_rediscover(square, tmp_path):
    Opts = verbs.get("apply").options
    assert Opts(image=square, directions=square, dtype="bf16").differentiates() is False
    with pytest.raises(InputError, match="--dtype bfloat16"):
        Opts(image=square, directions=square, dtype="bf16", rediscover=True)
    assert not verbs.get("invert").options(image=square, dtype="float16").differentiates()
    # a batch line is refused when the file is read, with its line number
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"verb": "remove", "image": str(square), "box": [1, 1, 5, 5],
                                "dtype": "float16"}) + "\n")
    (job,) = read_jobs(jobs)
    assert job.error.startswith("line 1: verb 'remove': --dtype float16")


# ------------------------------------------------------------------------------ settings.json
def test_settings_record_the_device_dtype_and_grid_actually_used(cli, tiny, square, tmp_path):
    out = tmp_path / "inv"
    r = _invoke(cli, ["invert", square, "--model", tiny, "--t", "500", "--steps", "10",
                      "--dtype", "fp64", "--out", out])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "settings.json").read_text())
    assert s["device"] == "cpu" and s["dtype"] == "torch.float64"
    assert s["options"]["dtype"] == "float64"  # the alias resolved to the dtype used
    assert s["options"]["steps"] == 10 and s["options"]["t"] == 500
    assert not set(RESERVED) & set(s["options"])  # out and force belong to the runner
    assert s["sampling_grid"]["timesteps"] == list(range(0, 1000, 100))
    # resolved defaults: curves' t defaults to the top of the grid and is recorded as such
    out = tmp_path / "cur"
    r = _invoke(cli, ["curves", square, "--model", tiny, "--steps", "10", "--pixel", "3,4",
                      "--out", out])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "settings.json").read_text())
    assert s["options"]["t"] == 900 and s["options"]["pixel"] == [[3, 4]]


def test_a_settings_json_line_reruns_its_verb_in_batch_and_reproduces_it(cli, tiny, square,
                                                                         tmp_path):
    first = tmp_path / "first"
    r = _invoke(cli, ["inpaint", square, "--model", tiny, "--box", "4,5,10,12", "--steps", "5",
                      "--resample", "1", "--seed", "7", "--out", first])
    assert r.exit_code == 0, r.output
    r = _invoke(cli, ["invert", square, "--model", tiny, "--t", "500", "--steps", "10",
                      "--exact", "--out", tmp_path / "inv"])
    assert r.exit_code == 0, r.output
    jobs = tmp_path / "jobs.jsonl"
    lines = [(first / "settings.json").read_text(), (tmp_path / "inv" / "settings.json")
             .read_text()]
    jobs.write_text("".join(json.dumps(json.loads(t)) + "\n" for t in lines))  # one line each
    summary = run_batch(jobs, tmp_path / "batch")
    assert summary.count("done") == 2, [rec["error"] for rec in summary.records]
    again = tmp_path / "batch" / "job-0001"
    assert (again / "result.png").read_bytes() == (first / "result.png").read_bytes()
    a = json.loads((first / "settings.json").read_text())
    b = json.loads((again / "settings.json").read_text())
    assert a["options"] == b["options"] and a["locality"] == b["locality"]
    inv = json.loads((tmp_path / "batch" / "job-0002" / "settings.json").read_text())
    assert inv["psnr"] == pytest.approx(json.loads(lines[1])["psnr"], abs=1e-6)
    assert inv["options"]["exact"] is True


def test_python_api_result_is_typed(tiny, square):
    res = verbs.run("inpaint", image=square, model=str(tiny), box=(4, 5, 10, 12),
                    method="mean-fill")
    from diffgeo.verbs.inpaint import InpaintResult

    assert isinstance(res, InpaintResult)
    assert isinstance(res.image, torch.Tensor) and res.image.shape == (1, 3, 16, 16)
    assert res.settings["options"]["method"] == "mean-fill"
    assert res.report()[0].startswith("mean-fill: MSE inside")
    with pytest.raises(InputError, match="unknown verb"):
        verbs.run("blur")


# ------------------------------------------------------------------------------ one composite
def test_the_exemplar_composite_copies_what_the_first_step_pins():
    from diffgeo.verbs.exemplar import composite

    src = torch.zeros(1, 3, 4, 4)
    ex = torch.ones(1, 3, 4, 4)
    m = torch.tensor([0.0, 0.2, 0.5, 1.0]).repeat(4, 1)[None, None]  # 1 = keep the source
    out = composite(src, [ex], [m], threshold=0.3)
    # above the first threshold the source is kept, at or below it the exemplar is copied
    assert out[0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    inverted = composite(src, [ex], [m], threshold=0.3, invert_maps=True)
    assert inverted[0, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]  # 1 - m: 1, .8, .5, 0


def test_every_folder_verbs_options_survive_settings_json(square):
    """options.to_dict() (what settings.json records) builds the same options again."""
    p = str(square)
    examples = {
        "invert": dict(image=p, t=500, exact=True),
        "curves": dict(image=p, pixel=("3,4",), row=(2,), box="1,1,4,4", definition="all"),
        "saliency-map": dict(image=p, definition="exact", estimator="gram", probes=3),
        "transfer": dict(image=p, box="1,1,4,4", reference="8,8", mode="faithful"),
        "remove": dict(image=p, mask=p, match_outside_stats=True, refresh_drift=0.1),
        "adjust-saliency": dict(image=p, box="1,1,4,4", decrease=True, decode_blend=False),
        "blend": dict(image=p, mask=p, no_localized=True),
        "inpaint": dict(image=p, box="1,1,4,4", method="mean-fill", fit="crop"),
        "directions": dict(image=p, mask=p, project="none", preview="-5,5"),
        "apply": dict(image=p, directions=p, strength="-5,0,5", window="0,400", mode="replace"),
        "exemplar": dict(source=p, exemplar=(p, p), map=(p, p), place=("1,2", "3,4,0.5"),
                         threshold="cubic", dtype="fp16"),
    }
    assert set(examples) == {v.name for v in verbs.all_verbs() if v.batchable}
    for name, values in examples.items():
        opts = verbs.get(name).options(**values)
        recorded = json.loads(json.dumps(opts.to_dict()))
        again = verbs.get(name).options.build(recorded)
        assert dataclasses.replace(again, out=None) == opts, name
