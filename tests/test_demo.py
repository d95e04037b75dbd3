"""Tests for diffgeo.demo (run_demo) and the ``diffgeo demo`` verb."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffgeo.cli import app
from diffgeo.demo import run_demo
from diffgeo.errors import OutputExistsError
from diffgeo.train import build_unet, export_model

LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """An untrained tiny-16 pixel model folder (no bundled scenes at 16px: exercises the
    procedural-scene fallback)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = build_unet("tiny-16")
    return export_model(unet, tmp_path_factory.mktemp("models") / "tiny")


def _links(page: Path) -> list[str]:
    return [html.unescape(u) for u in LINK.findall(page.read_text(encoding="utf-8"))]


def _check_links(page: Path) -> list[str]:
    """Every src/href is a relative path to an existing, readable file beside the page."""
    links = _links(page)
    assert links, "the page links no files"
    for u in links:
        assert "://" not in u and not u.startswith(("/", "data:")), u
        target = page.parent / u
        assert target.resolve().is_relative_to(page.parent.resolve()), u
        assert target.is_file(), u
        if u.endswith(".png"):
            with Image.open(target) as im:
                im.verify()
    return links


def _sections(page: Path) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_demo(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "site"
    page = run_demo(out=out, model=str(tiny), quick=True)
    assert page == out / "index.html"
    return page


def test_tiny_demo_page_links_only_existing_files(tiny_demo):
    links = _check_links(tiny_demo)
    assert _sections(tiny_demo) == ["Model", "Samples", "DDIM inversion and reconstruction",
                                    "Generation curves and saliency",
                                    "Curve matching: removal, saliency, blending",
                                    "Region-based editing (h-space directions)",
                                    "Progressive exemplar editing (PIXELS)"]
    for name in ("curves.png", "saliency.png", "rbe-0.png", "rbe-global.png", "cm-0.png",
                 "cm-3.png", "cm-truth.png", "cm-fill-1.png", "cm-fill-2.png", "cm-fill-3.png"):
        assert (tiny_demo.parent / name).is_file()
    # Quick run: 8 samples in one strip, 2 scenes x (input, X_t, plain, exact), the PSNR plot.
    assert links.count("samples-0.png") == 1
    assert {f"inv-{i}-{k}.png" for i in range(2) for k in ("input", "xt", "plain", "exact")} \
        <= set(links)
    assert "inversion-psnr.png" in links
    # The strip holds 8 samples of 16 px with 2 px gaps.
    strip = np.asarray(Image.open(tiny_demo.parent / "samples-0.png"))
    assert strip.shape == (16, 8 * 16 + 7 * 2, 3)
    settings = json.loads((tiny_demo.parent / "settings.json").read_text())
    assert settings["verb"] == "demo" and settings["quick"] is True and settings["steps"] == 10


def test_demo_refuses_to_overwrite_without_force(tiny, tiny_demo):
    out = tiny_demo.parent
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="force"):
        run_demo(out=out, model=str(tiny), quick=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    page = run_demo(out=out, model=str(tiny), quick=True, force=True)
    assert page == out / "index.html"
    _check_links(page)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no stray temp files


def test_demo_cli_on_the_default_model(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)],
                                env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    page = out / "index.html"
    assert f"open {page}" in result.stdout
    sections = _sections(page)
    assert "Samples" in sections and "DDIM inversion and reconstruction" in sections
    assert "Generation curves and saliency" in sections
    _check_links(page)
    text = page.read_text(encoding="utf-8")
    assert "model default" in text
    # Bundled 32px scenes are used with the 32px default model; the page reports both PSNRs.
    assert re.search(r"Mean PSNR: plain [\d.]+ dB, exact [\d.]+ dB", text)
    strip = np.asarray(Image.open(out / "samples-0.png"))
    assert strip.shape == (32, 8 * 32 + 7 * 2, 3)
