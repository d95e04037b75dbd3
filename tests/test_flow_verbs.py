"""Every verb end to end on both flow-matching families (tiny SD3 and FLUX folders)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from conftest import _assert_user_error
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from flow_models import write_flux, write_sd3
from PIL import Image
from typer.testing import CliRunner

from diffgeo import verbs
from diffgeo.backbones import load_backbone
from diffgeo.backbones.flow import FlowBackbone
from diffgeo.backbones.flux import FluxBackbone
from diffgeo.backbones.sd3 import SD3Backbone
from diffgeo.cli import app
from diffgeo.editing.pixels import PixelsConfig, pixels_edit
from diffgeo.errors import InputError
from diffgeo.sampling import Grid, sample

FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-verbs")
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / f"{name}.png")
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(root / "mask.png")
    return {"root": root, "a": root / "a.png", "b": root / "b.png", "mask": root / "mask.png",
            "sd3": write_sd3(root / "sd3", t5=False, num_layers=3),
            "flux": write_flux(root / "flux"),
            "flux-cfg": write_flux(root / "flux-cfg", guidance_embeds=False)}


@pytest.fixture(scope="module")
def models(files) -> dict[str, FlowBackbone]:
    """One backbone per family for the method verbs, passed in as batch and the web app pass
    theirs (the folder-loading path is what the info, invert and CLI tests run). Prompts are
    padded to 16 text tokens instead of the pipelines' 256 (SD3) / 512 (FLUX): joint attention
    over ~32 tokens instead of ~300 is most of these tests' time, and no claim here depends on
    the padding (generation against the pipelines' defaults is test_sd3's and test_flux's)."""
    sd3 = StableDiffusion3Pipeline.from_pretrained(files["sd3"], text_encoder_3=None,
                                                   tokenizer_3=None)
    return {"sd3": SD3Backbone(sd3, name=str(files["sd3"]), max_sequence_length=16),
            "flux": FluxBackbone(FluxPipeline.from_pretrained(files["flux"]),
                                 name=str(files["flux"]), max_sequence_length=16)}


@pytest.fixture(scope="module")
def on(files, models):
    """The options and backbone of a family's method-verb run: ``_run(..., **on("sd3"))``."""
    return lambda family: dict(model=str(files[family]), backbone=models[family])


def _run(name: str, out: Path | None, **kw):
    return verbs.run(name, **kw) if out is None else verbs.run(name, **kw, out=out)


@pytest.mark.parametrize("family", FAMILIES)
def test_info_describes_the_family(files, family):
    res = _run("info", None, model=str(files[family]))
    text = "\n".join(res.report())
    assert "prediction_type: flow" in text
    assert f"kind: {family} (flow-matching transformer, 3 blocks, h = " in text
    assert "token grid 4x4 of 4px" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_invert_exact_round_trip(files, family, tmp_path):
    res = _run("invert", tmp_path / "inv", image=files["a"], model=str(files[family]), steps=6,
               t=1000, exact=True, tol=1e-6)
    s = json.loads((tmp_path / "inv" / "settings.json").read_text())
    assert max(s["exact_residuals"]) <= 1e-6
    assert s["state_max_error"] <= 1e-4
    assert s["sampling_grid"]["sigmas"][-1] == 1.0 and s["grid"][-1] == 1000.0
    assert res.trajectory.timesteps[0] is None
    plain = _run("invert", None, image=files["a"], model=str(files[family]), steps=6, t=1000)
    assert plain.settings["state_max_error"] > 10 * s["state_max_error"]


@pytest.mark.parametrize("family", FAMILIES)
def test_curves_and_saliency_map(files, on, family, tmp_path):
    fast = dict(steps=5, window=2, t_min=0, k=2)
    res = _run("curves", tmp_path / "c", image=files["a"], **on(family),
               pixel=((3, 4),), definition="exact" if family == "sd3" else "h",
               **fast)
    for per in res.settings["fluctuation"].values():
        assert all(np.isfinite(v) and v >= 0 for v in per.values())
    assert res.settings["options"]["t"] == 1000.0   # the top of the flow grid
    sal = _run("saliency-map", tmp_path / "s", image=files["a"], **on(family),
               **fast)
    assert sal.saliency.shape[-2:] == (8, 8) and bool(torch.isfinite(sal.saliency).all())
    assert float(sal.saliency.std()) > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("verb", ["transfer", "remove"])
def test_curve_matching_edits(files, on, family, verb, tmp_path):
    extra = {"reference": (2, 12)} if verb == "transfer" else {}
    _run(verb, tmp_path / "e", image=files["a"], **on(family), steps=8, t=500,
         iterations=2, mask=files["mask"], **extra)
    rows = list(csv.DictReader((tmp_path / "e" / "history.csv").open()))
    assert rows and all(np.isfinite(float(r["loss"])) for r in rows)
    s = json.loads((tmp_path / "e" / "settings.json").read_text())
    assert isinstance(s["options"]["t"], float)   # the level 500 named on the flow grid
    assert (tmp_path / "e" / "result.png").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_directions_then_apply(files, on, family, tmp_path):
    d = _run("directions", tmp_path / "d", image=files["a"], **on(family), steps=8,
             t=500, k=2, mask=files["mask"])
    sv = d.settings["singular_values"]
    assert len(sv) == 2 and sv[0] >= sv[1] > 0
    a = _run("apply", tmp_path / "a", image=files["a"], **on(family),
             directions=tmp_path / "d", index=0, strength=(-10.0, 0.0, 10.0))
    # α = 0 is plain generation from the inverted state, bit for bit
    bb = on(family)["backbone"]
    g = Grid.for_model(bb, 8).up_to(a.edit.timestep)
    assert torch.equal(a.edit.states[1:2], sample(bb, a.edit.xt, g).last)
    assert a.settings["locality"][1]["mse_inside"] <= 1e-10   # (VAE decode batch round-off)
    assert a.settings["locality"][2]["mse_inside"] > 1e-6
    # another block's h has the same shape but another meaning: refused before any work
    assert d.directions.settings["backbone"]["h_block"] == bb.h_block
    block = bb.h_block
    try:
        bb.h_block = block + 1
        with pytest.raises(InputError, match=f"found with h at block {block}, but this "
                                             f"backbone's h is block {block + 1}.*--h-block"):
            _run("apply", tmp_path / "b", image=files["a"], **on(family),
                 directions=tmp_path / "d", index=0, strength=(10.0,))
    finally:
        bb.h_block = block
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_exemplar_and_inpaint(files, on, family, tmp_path):
    r = _run("exemplar", tmp_path / "x", source=files["a"], exemplar=(files["b"],),
             map=(files["mask"],), **on(family), steps=5, strength=0.6)
    assert r.image.shape == (1, 3, 16, 16) and bool(torch.isfinite(r.image).all())
    i = _run("inpaint", tmp_path / "i", image=files["a"], **on(family), steps=5,
             box=(4, 4, 12, 12))
    assert np.isfinite(i.settings["locality"]["mse_inside"])
    assert i.settings["locality"]["mse_outside"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_binary_map_starts_from_the_surgical_latent(models, family):
    """As on U-Nets: with a binary map, step 0 pins (1 − σ)·x + σ·z of the source inside and of
    the exemplar outside (the flow's forward process)."""
    bb = models[family]
    g = torch.Generator().manual_seed(1)
    src = torch.randn(1, *bb.state_shape, generator=g)
    ex = torch.randn(1, *bb.state_shape, generator=g)
    mu = torch.zeros(bb.state_shape[-2:])
    mu[:, : mu.shape[1] // 2] = 1
    r = pixels_edit(bb, src, [ex], [mu], PixelsConfig(strength=0.8),
                    generator=torch.Generator().manual_seed(5), grid=6, record_states=True)
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(src.shape, generator=g), torch.randn(src.shape, generator=g)
    s = Grid.for_model(bb, 6).sigma(r.timesteps[0])
    m = mu[None, None]
    surgical = ((1 - s) * src + s * z1) * m + ((1 - s) * ex + s * z2) * (1 - m)
    assert torch.equal(r.states[0], r.surgical)
    assert torch.allclose(r.surgical, surgical, atol=1e-6)


CLI_ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "HF_HUB_OFFLINE": "1"}
#: what `info` says h is with --h-block 2 (3 blocks: SD3 0..2; FLUX 1 double + 2 single)
BLOCK_2 = {"sd3": "h = block 2,", "flux": "h = single-stream block 1,"}


def _cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env=CLI_ENV)


@pytest.mark.parametrize("family", FAMILIES)
def test_h_block_on_the_cli(files, family, tmp_path):
    r = _cli("info", files[family], "--h-block", 2)
    assert r.exit_code == 0, r.output
    assert BLOCK_2[family] in r.output
    default = _cli("info", files[family])
    assert {"sd3": "h = block 0,", "flux": "h = double-stream block 0,"}[family] in default.output
    out = tmp_path / "inv"
    r = _cli("invert", files["a"], "--model", files[family], "--h-block", 2, "--steps", 3,
             "--t", 1000, "--out", out)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "settings.json").read_text())
    assert s["options"]["h_block"] == 2   # read off the backbone that ran
    plain = _run("invert", None, image=files["a"], model=str(files[family]), steps=3, t=1000)
    assert plain.settings["options"]["h_block"] == 0   # the default (n/2 - 1), resolved


def test_guidance_on_the_cli(files, tmp_path):
    r = _cli("info", files["flux"], "--guidance", 5)
    assert r.exit_code == 0, r.output
    assert "embedded guidance 5.0" in r.output
    a = load_backbone(files["flux"], guidance=5.0)
    b = load_backbone(files["flux"])
    assert b.embedded_guidance == 3.5
    x = torch.randn(1, *a.state_shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a.velocity(x, 500.0), b.velocity(x, 500.0))   # it reaches the model


@pytest.mark.parametrize(("model", "args", "fragments"), [
    ("sd3", ("--h-block", 3), ("--h-block must be an integer in 0..2",)),
    ("flux", ("--h-block", 3), ("--h-block must be an integer in 0..2",)),
    ("sd3", ("--h-block", -1), ("--h-block must be >= 0",)),
    ("sd3", ("--guidance", 2), ("--guidance", "has no guidance_embeds")),
    ("flux-cfg", ("--guidance", 2), ("--guidance", "has no guidance_embeds")),
    ("sd3", ("--guidance", "nan"), ("--guidance must be a finite number",)),
    ("default", ("--h-block", 0), ("--h-block", "flow-matching transformers", "U-Net")),
    ("default", ("--guidance", 3), ("--guidance", "flow-matching transformers", "U-Net")),
])
def test_bad_h_block_and_guidance_are_refused_before_work(files, model, args, fragments,
                                                          tmp_path):
    folder = "default" if model == "default" else files[model]
    out = tmp_path / "out"
    r = _cli("invert", files["a"], "--model", folder, "--steps", 3, "--out", out, *args)
    _assert_user_error(r, *fragments)
    assert not out.exists()


def test_flow_options_are_checked_before_the_weights_are_read(files, monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("weights read before the options were checked")

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", refuse)

    with pytest.raises(InputError, match="h_block must be an integer in 0..2"):
        load_backbone(files["flux"], h_block=3)
    with pytest.raises(InputError, match="has no guidance_embeds"):
        load_backbone(files["flux-cfg"], guidance=2.0)
    with pytest.raises(InputError, match="U-Net"):
        load_backbone("default", h_block=0)


def test_pipeline_objects_take_the_flow_options(models):
    from diffgeo.errors import InputError

    pipe = models["flux"].pipe
    assert load_backbone(pipe, h_block=2, guidance=4.0).summary().kind.endswith(
        "h = single-stream block 1, token grid 4x4 of 4px), embedded guidance 4.0")
    with pytest.raises(InputError, match="h_block must be an integer in 0..2"):
        load_backbone(pipe, h_block=3)
    with pytest.raises(InputError, match="has no guidance_embeds"):
        load_backbone(models["sd3"].pipe, guidance=2.0)


def test_the_web_apps_session_loads_and_reproduces_the_h_block(files, tmp_path):
    """`diffgeo ui --h-block N`: the app's model is loaded at block N and every action's
    command (and settings) says so, so it reproduces on the CLI."""
    from diffgeo.ui.session import Session

    session = Session(str(files["flux"]), h_block=1, steps=3)
    try:
        assert session.backbone.h_block == 1
        run = session.run("invert", image=str(files["a"]), t=1000)
        assert "--h-block 1" in run.command
        assert run.result.settings["options"]["h_block"] == 1
    finally:
        session.close()
    with pytest.raises(InputError, match="h_block must be an integer in 0..2"):
        Session(str(files["flux"]), h_block=3)
